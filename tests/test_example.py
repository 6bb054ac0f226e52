"""The contaminated-data example end to end, its argument checks, the exports and the LibTorch sampler (its longer
runs and its notebook form: tests/test_example_runs.py)."""

import csv
import os
import platform
import runpy
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subprocess_pythonpath

import robust_diffusion as rd
from robust_diffusion.training import experiment
from robust_diffusion.training.data import fashion_mnist_root
from robust_diffusion.training.export import SCHEDULE_FORMAT, export_model, read_schedule_file, write_schedule_file
from robust_diffusion.training.sampling import ddim_sample, ddpm_sample, flow_sample
from robust_diffusion.training.trainer_checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cifar10_contaminated.py"
SAMPLER_SOURCE = REPO / "examples" / "cpp"
HAS_FASHION_MNIST = (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(not HAS_FASHION_MNIST, reason="dataset-fashion-mnist is not installed")
SMOKE_LOSSES = ["kl", "hellinger", "ned", "huber", "clipped_mse", "ned+debias", "diffusers_huber"]
#: Under CI (CI=true) what tests need must be there: a missing sampler toolchain or Jupyter kernel fails, not skips.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


def _load_torchscript(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def _unavailable(reason):
    """Skip, except under CI, where a missing requirement is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required there)")
    pytest.skip(reason)


def _read_netpbm(path):
    raw = Path(path).read_bytes()
    magic, width, height, maxval, rest = raw.split(maxsplit=4)
    assert magic in (b"P5", b"P6") and maxval == b"255"
    channels = 1 if magic == b"P5" else 3
    pixels = np.frombuffer(rest, dtype=np.uint8)
    assert pixels.size == int(width) * int(height) * channels
    return pixels.reshape(int(height), int(width), channels)


def _read_png(path):
    """Decode an 8-bit greyscale or RGB PNG by the specification, checking every chunk's CRC-32 (zlib checks the
    Adler-32), and compare with PIL's decoding; returns [H, W, C] uint8."""
    from PIL import Image  # a dependency of matplotlib

    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks, position = [], 8
    while position < len(raw):
        (length,) = struct.unpack(">I", raw[position:position + 4])
        kind, data = raw[position + 4:position + 8], raw[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", raw[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + data), f"bad CRC in the {kind!r} chunk"
        chunks.append((kind, data))
        position += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and colour in (0, 2) and (compression, filtering, interlace) == (0, 0, 0)
    channels = 1 if colour == 0 else 3
    rows = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))  # raises on a bad Adler-32
    assert len(rows) == height * (1 + width * channels)
    rows = np.frombuffer(rows, dtype=np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()  # filter type none
    pixels = rows[:, 1:].reshape(height, width, channels)
    with Image.open(path) as image:
        assert image.mode == ("L" if channels == 1 else "RGB") and image.size == (width, height)
        decoded = np.asarray(image)
    np.testing.assert_array_equal(decoded.reshape(height, width, channels), pixels)
    return pixels


# ---------------------------------------------------------------------------------------------- C++ sampler
@pytest.fixture(scope="session")
def sampler_binary(tmp_path_factory):
    """The rd_sample binary: $RD_SAMPLER, else built here, from the current examples/cpp sources, into a fresh
    temporary directory with CMake against the running torch's LibTorch (a standalone build of sample.cpp takes
    about half a minute). A prebuilt build/cmake binary is never used: tools/test.sh runs pytest before its CMake
    build, so it would be the previous run's. Skipped without cmake, a C++ compiler or LibTorch's CMake files,
    except under CI, where that fails."""
    if os.environ.get("RD_SAMPLER"):
        binary = Path(os.environ["RD_SAMPLER"])
        assert binary.is_file(), f"RD_SAMPLER={binary} does not exist"
        return binary
    cmake = shutil.which("cmake")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    prefix = Path(torch.utils.cmake_prefix_path)
    if not cmake or not compiler or not (prefix / "Torch" / "TorchConfig.cmake").is_file():
        _unavailable("building the C++ sampler needs cmake, a C++ compiler and LibTorch's CMake files")
    build = tmp_path_factory.mktemp("rd_sample_build")
    for command in ([cmake, "-S", str(SAMPLER_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={prefix}"],
                    [cmake, "--build", str(build), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    binary = build / "rd_sample"
    assert binary.is_file(), f"the CMake build did not produce {binary}"
    return binary


#: (rd_sample arguments, the Python sampler it must reproduce). All draw their noise from one CPU generator
#: seeded with --seed in the same order (initial noise, then one draw per step but the last), so the stochastic
#: samplers must match too, not only DDIM with eta 0.
SAMPLER_VARIANTS = {
    "ddim": ([], lambda model, schedule, shape, steps, generator: ddim_sample(
        model, schedule, shape, num_steps=steps, generator=generator)),
    "ddim-eta": (["--eta", "0.5"], lambda model, schedule, shape, steps, generator: ddim_sample(
        model, schedule, shape, num_steps=steps, eta=0.5, generator=generator)),
    "ddpm": (["--sampler", "ddpm"], lambda model, schedule, shape, steps, generator: ddpm_sample(
        model, schedule, shape, num_steps=steps, generator=generator)),
}
#: The same for a flow-matching export (sampling.flow_sample; Euler is the default for such a schedule file).
FLOW_SAMPLER_VARIANTS = {
    "euler": ([], lambda model, schedule, shape, steps, generator: flow_sample(
        model, schedule, shape, num_steps=steps, generator=generator)),
    "heun": (["--sampler", "heun"], lambda model, schedule, shape, steps, generator: flow_sample(
        model, schedule, shape, num_steps=steps, solver="heun", generator=generator)),
}


def _check_cpp_against_python(binary, prefix, tmp_path, num_samples=4, steps=3, seed=7, variant="ddim",
                              image_format="png", extra=(), python_sampler=None, tag=""):
    """rd_sample's samples must equal the Python sampler's with the same model, schedule and seed. ``extra``:
    more rd_sample arguments, with ``python_sampler`` (the variant's signature) the sampler they must equal."""
    out = tmp_path / f"cpp_samples_{variant}_{image_format}{tag}"
    arguments, variant_sampler = {**SAMPLER_VARIANTS, **FLOW_SAMPLER_VARIANTS}[variant]
    python_sampler = python_sampler or variant_sampler
    result = subprocess.run([str(binary), "--model", f"{prefix}.torchscript.pt", "--schedule",
                             f"{prefix}.schedule.txt", "--out", str(out), "--num-samples", str(num_samples),
                             "--steps", str(steps), "--seed", str(seed), "--format", image_format, *arguments,
                             *extra], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {num_samples} samples" in result.stdout
    schedule, header = read_schedule_file(f"{prefix}.schedule.txt")
    shape = [int(s) for s in header["image_shape"].split()]
    model = _load_torchscript(f"{prefix}.torchscript.pt")
    expected = python_sampler(model, schedule, (num_samples, *shape), steps, torch.Generator().manual_seed(seed))
    expected = ((expected.double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if image_format == "png":
        read, suffix = _read_png, ".png"
    else:
        read, suffix = _read_netpbm, ".pgm" if shape[0] == 1 else ".ppm"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"sample_{i:04d}{suffix}" for i in range(num_samples)] + [f"grid{suffix}"])
    images = [read(out / f"sample_{i:04d}{suffix}") for i in range(num_samples)]
    for i, image in enumerate(images):
        assert image.shape == expected[i].shape
        assert np.abs(image.astype(int) - expected[i].astype(int)).max() <= 1, (variant, i)
    grid = read(out / f"grid{suffix}")
    assert grid.shape[2] == shape[0] and grid.shape[0] > shape[1]
    h, w = shape[1:]
    np.testing.assert_array_equal(grid[2:2 + h, 2:2 + w], images[0])  # the first sample, after the 2-pixel border
    np.testing.assert_array_equal(grid[2:2 + h, 4 + w:4 + 2 * w], images[1])
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()


# ---------------------------------------------------------------------------------------------- export
def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = experiment.build_model("micro", 1)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would make every output 0
            p.add_(0.05 * torch.randn_like(p))
    schedule = rd.NoiseSchedule.cosine(200)
    example = (torch.randn(2, 1, 16, 16), torch.tensor([3, 150]))
    paths = export_model(model, tmp_path / "net", example, schedule=schedule)
    assert sorted(paths) == ["exported", "schedule", "torchscript"]
    assert model.training  # the training mode is restored
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 50, 199])  # another batch size: the batch is dynamic
    with torch.no_grad():
        expected = model.eval()(x, t)
        torch.testing.assert_close(_load_torchscript(paths["torchscript"])(x, t), expected)
        torch.testing.assert_close(torch.export.load(str(paths["exported"])).module()(x, t), expected)
    loaded, header = read_schedule_file(paths["schedule"])
    assert header["format"] == SCHEDULE_FORMAT and header["image_shape"] == "1 16 16"
    assert "num_classes" not in header and "null_label" not in header  # an unconditional export's file as before
    assert torch.equal(loaded.alphas_cumprod, schedule.alphas_cumprod)  # %.17g round-trips float64 exactly


def _conditional_micro_model(channels=1, num_classes=3):
    torch.manual_seed(0)
    model = experiment.build_model("micro", channels, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_conditional_export_round_trip(tmp_path):
    """A class-conditional model's programs take int64 labels [B] as a third input (any batch size) and equal the
    eager model; its schedule file names the classes and the null label."""
    model = _conditional_micro_model()
    schedule = rd.NoiseSchedule.linear(100)
    example = (torch.randn(2, 1, 12, 12), torch.tensor([3, 50]), torch.tensor([0, 3]))
    paths = export_model(model, tmp_path / "cond", example, schedule=schedule)
    assert sorted(paths) == ["exported", "schedule", "torchscript"]
    x, t, labels = torch.randn(3, 1, 12, 12), torch.tensor([0, 50, 99]), torch.tensor([2, 3, 0])
    with torch.no_grad():
        expected = model.eval()(x, t, labels)
        assert not torch.allclose(expected, model(x, t, torch.tensor([1, 1, 1])))  # the labels matter
        torch.testing.assert_close(_load_torchscript(paths["torchscript"])(x, t, labels), expected)
        torch.testing.assert_close(torch.export.load(str(paths["exported"])).module()(x, t, labels), expected)
    loaded, header = read_schedule_file(paths["schedule"])
    assert (header["num_classes"], header["null_label"]) == ("3", "3")
    assert torch.equal(loaded.alphas_cumprod, schedule.alphas_cumprod)
    plain = experiment.build_model("micro", 1)
    for net, inputs, message in [
            (model, example[:2], r"the model is class-conditional \(num_classes=3\), so example_inputs must be "
                                 r"\(x_t, t, class_labels\), got 2"),
            (plain, example, r"the model is unconditional, so example_inputs must be \(x_t, t\), got 3"),
            (model, (*example[:2], example[2].float()), "class_labels must be int64")]:
        with pytest.raises(ValueError, match=message):
            export_model(net, tmp_path / "bad", inputs)
    assert not list(tmp_path.glob("bad*"))  # refused before writing anything


def _export_perturbed_micro_model(prefix, channels):
    torch.manual_seed(0)
    model = experiment.build_model("micro", channels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return export_model(model, prefix, (torch.randn(2, channels, 12, 12), torch.tensor([1, 2])),
                        schedule=rd.NoiseSchedule.linear(100))


@pytest.mark.slow
def test_cpp_sampler_matches_python(tmp_path, sampler_binary):
    paths = _export_perturbed_micro_model(tmp_path / "net", 1)
    for variant in SAMPLER_VARIANTS:
        _check_cpp_against_python(sampler_binary, tmp_path / "net", tmp_path, variant=variant)
    _check_cpp_against_python(sampler_binary, tmp_path / "net", tmp_path, image_format="netpbm")  # PGM
    bad = subprocess.run([str(sampler_binary), "--model", str(tmp_path / "missing.pt"), "--schedule",
                          str(paths["schedule"])], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "model file not found" in bad.stderr
    usage = subprocess.run([str(sampler_binary), "--model", str(paths["torchscript"])], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "--schedule is required" in usage.stderr
    bad_format = subprocess.run([str(sampler_binary), "--model", str(paths["torchscript"]), "--schedule",
                                 str(paths["schedule"]), "--format", "jpeg"], capture_output=True, text=True,
                                timeout=60)
    assert bad_format.returncode == 2 and "--format must be png or netpbm" in bad_format.stderr


def _export_perturbed_flow_model(prefix, shift=3.0):
    torch.manual_seed(0)
    model = experiment.build_model("micro", 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = rd.FlowMatchingSchedule(shift=shift)
    return export_model(model, prefix, (torch.randn(2, 1, 12, 12), schedule.model_timestep(torch.tensor([0.1, 0.9]))),
                        schedule=schedule)


def test_flow_export_writes_a_schedule_file_without_values(tmp_path):
    paths = _export_perturbed_flow_model(tmp_path / "flow", shift=2.5)
    text = paths["schedule"].read_text()
    assert "# process flow" in text and "# shift 2.5" in text and "# prediction_type flow_prediction" in text
    assert all(line.startswith("#") for line in text.splitlines())
    schedule, header = read_schedule_file(paths["schedule"])
    assert isinstance(schedule, rd.FlowMatchingSchedule) and schedule.shift == 2.5
    assert schedule.num_train_timesteps == 1000 and header["image_shape"] == "1 12 12"
    with pytest.raises(TypeError, match="write_schedule_file: the samplers take a NoiseSchedule or a "
                                        "FlowMatchingSchedule, got EDMSchedule"):
        write_schedule_file(tmp_path / "edm.txt", rd.EDMSchedule(), (1, 4, 4))


@pytest.mark.slow
def test_cpp_sampler_matches_python_on_flow_matching(tmp_path, sampler_binary):
    """rd_sample learns the flow sampler: Euler and Heun on a flow-matching export equal sampling.flow_sample."""
    paths = _export_perturbed_flow_model(tmp_path / "flow")
    for variant in FLOW_SAMPLER_VARIANTS:
        _check_cpp_against_python(sampler_binary, tmp_path / "flow", tmp_path, variant=variant, steps=4)
    wrong = subprocess.run([str(sampler_binary), "--model", str(paths["torchscript"]), "--schedule",
                            str(paths["schedule"]), "--sampler", "ddim", "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "--sampler must be euler or heun for a flow-matching model" in wrong.stderr
    ddpm = _export_perturbed_micro_model(tmp_path / "net", 1)
    wrong = subprocess.run([str(sampler_binary), "--model", str(ddpm["torchscript"]), "--schedule",
                            str(ddpm["schedule"]), "--sampler", "heun", "--out", str(tmp_path / "y")],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "--sampler must be ddim or ddpm for a DDPM model" in wrong.stderr


def _export_conditional(prefix, flow=False):
    schedule = rd.FlowMatchingSchedule(shift=3.0) if flow else rd.NoiseSchedule.linear(100)
    times = schedule.model_timestep(torch.tensor([0.1, 0.9])) if flow else torch.tensor([1, 2])
    return export_model(_conditional_micro_model(), prefix, (torch.randn(2, 1, 12, 12), times, torch.tensor([0, 3])),
                        schedule=schedule)


def _guided(sample, labels, scale, **kwargs):
    """A SAMPLER_VARIANTS-style sampler conditioned on ``labels`` (the null label 3, read by a consumer from the
    schedule file: a loaded TorchScript model does not know it)."""
    return lambda model, schedule, shape, steps, generator: sample(
        model, schedule, shape, num_steps=steps, generator=generator, class_labels=labels, guidance_scale=scale,
        null_label=3, **kwargs)


@pytest.mark.slow
def test_cpp_sampler_with_classes_matches_python(tmp_path, sampler_binary):
    """--class and --guidance-scale: rd_sample equals the Python samplers given the same labels (a list is cycled
    over the samples) and classifier-free guidance, for DDIM, DDPM and flow matching, across --batch-size batches."""
    _export_conditional(tmp_path / "cond")
    _check_cpp_against_python(sampler_binary, tmp_path / "cond", tmp_path, extra=["--class", "0,2", "--guidance-scale",
                                                                                  "2.5"],
                              python_sampler=_guided(ddim_sample, [0, 2, 0, 2], 2.5))
    _check_cpp_against_python(sampler_binary, tmp_path / "cond", tmp_path, variant="ddpm", num_samples=3,
                              extra=["--class", "1", "--class", "3"],  # repeated, and the null label; scale 1
                              python_sampler=_guided(ddpm_sample, [1, 3, 1], 1.0))

    def in_two_batches(model, schedule, shape, steps, generator):
        # --batch-size 3 of 4 samples: two chains in a row from one generator, labels continuing the cycle.
        first = ddim_sample(model, schedule, (3, *shape[1:]), num_steps=steps, eta=0.5, generator=generator,
                            class_labels=[2, 0, 1], guidance_scale=0.5, null_label=3)
        second = ddim_sample(model, schedule, (1, *shape[1:]), num_steps=steps, eta=0.5, generator=generator,
                             class_labels=[2], guidance_scale=0.5, null_label=3)
        return torch.cat([first, second])

    _check_cpp_against_python(sampler_binary, tmp_path / "cond", tmp_path, variant="ddim-eta", tag="_batches",
                              extra=["--class", "2,0,1", "--guidance-scale", "0.5", "--batch-size", "3"],
                              python_sampler=in_two_batches)
    _export_conditional(tmp_path / "flow", flow=True)
    _check_cpp_against_python(sampler_binary, tmp_path / "flow", tmp_path, variant="heun", steps=4,
                              extra=["--class", "2", "--guidance-scale", "3"],
                              python_sampler=_guided(flow_sample, 2, 3.0, solver="heun"))


@pytest.mark.slow
def test_cpp_sampler_class_refusals(tmp_path, sampler_binary):
    """Each misuse of --class / --guidance-scale: exit status 2 and one line naming the fix."""
    cond = _export_conditional(tmp_path / "cond")
    plain = _export_perturbed_micro_model(tmp_path / "net", 1)
    cases = [
        (plain, ["--class", "1"], "rd_sample: --class needs a class-conditional export: "),
        (plain, ["--guidance-scale", "2"], "rd_sample: --guidance-scale guides a class-conditional model, and "),
        (cond, [], "rd_sample: the model is class-conditional (3 classes): pass --class C, C in 0..2 (or 3, the "
                   "null label, for unconditional samples)"),
        (cond, ["--class", "0,4"], "rd_sample: --class 4 is out of range: the model has classes 0..2 and the null "
                                   "label 3"),
        (cond, ["--class", "-1"], "rd_sample: --class expects an integer >= 0, got '-1'"),
        (cond, ["--class", "1,"], "rd_sample: --class expects an integer >= 0 or a comma list, got '1,'"),
        (cond, ["--class", "1", "--guidance-scale", "x"], "rd_sample: --guidance-scale expects a number, got 'x'"),
    ] + [(cond, ["--class", "1", "--guidance-scale", bad],
          f"rd_sample: --guidance-scale must be a finite number >= 0 (1: no guidance), got '{bad}'")
         for bad in ("-0.5", "nan", "inf")]
    for paths, arguments, message in cases:
        result = subprocess.run([str(sampler_binary), "--model", str(paths["torchscript"]), "--schedule",
                                 str(paths["schedule"]), "--out", str(tmp_path / "never"), "--steps", "1",
                                 *arguments], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (arguments, result.stderr)
        assert result.stderr.splitlines()[0].startswith(message), (arguments, result.stderr)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_cpp_sampler_writes_rgb_png(tmp_path, sampler_binary):
    _export_perturbed_micro_model(tmp_path / "rgb", 3)
    _check_cpp_against_python(sampler_binary, tmp_path / "rgb", tmp_path, num_samples=3, variant="ddpm")
    _check_cpp_against_python(sampler_binary, tmp_path / "rgb", tmp_path, num_samples=2, image_format="netpbm")
    # 110 samples: the grid's image data (142 x (1 + 156 * 3) bytes) need two stored deflate blocks of <= 65535.
    _check_cpp_against_python(sampler_binary, tmp_path / "rgb", tmp_path, num_samples=110, steps=1)


# ---------------------------------------------------------------------------------------------- the example
def _run_example(*argv, timeout=900):
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, argv)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _results(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The example's smoke preset with every loss family, run once for the tests below."""
    if not HAS_FASHION_MNIST:
        pytest.skip("dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("example") / "out"
    result = _run_example("--preset", "smoke", "--out", out, "--losses", *SMOKE_LOSSES)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@needs_fashion_mnist
@pytest.mark.slow
def test_example_end_to_end(smoke_run):
    out, result = smoke_run
    rows = _results(out)
    assert [r["loss"] for r in rows] == SMOKE_LOSSES + ["data: clean training images",
                                                       "data: contaminated training set"]
    for row in rows[:len(SMOKE_LOSSES)]:
        assert float(row["frechet_distance"]) >= 0 and 0 <= float(row["contaminant_fraction"]) <= 1
        assert 0 <= float(row["contaminant_fraction_hybrid"]) <= 1
        assert 0 <= float(row["auroc"]) <= 1
        assert row["settings"] == ("scale=1 form=huber" if row["loss"] == "diffusers_huber"
                                   else "scale=adaptive temperature=1" + (" tau=3" if row["loss"] == "clipped_mse"
                                                                           else " delta=1" if row["loss"] == "huber"
                                                                           else ""))
    assert rows[0]["auroc"] == "0.5"  # plain MSE: every weight is 1
    # Diversity and class histograms, and the evaluation networks' accuracy, on every row (the data rows too).
    for row in rows:
        for key in ("precision", "recall", "coverage", "class_tv", "classifier_accuracy", "judge_accuracy"):
            assert 0 <= float(row[key]) <= 1, (row["loss"], key)
        assert float(row["density"]) >= 0
    with open(out / "class_shares.csv", newline="") as f:
        shares = list(csv.DictReader(f))
    for loss in [r["loss"] for r in rows]:
        mine = [r for r in shares if r["loss"] == loss]
        assert [int(r["class"]) for r in mine] == list(range(10))
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1, abs=1e-3)
        assert all(float(r["confident_share"]) <= float(r["share"]) for r in mine)
        assert sum(float(r["training_share"]) for r in mine) == pytest.approx(1, abs=1e-3)
    # Every sample's probability and call under both detectors, beside its samples; the calls give the fractions.
    for row in rows[:len(SMOKE_LOSSES)]:
        with open(out / "runs" / row["loss"] / "detector_calls.csv", newline="") as f:
            calls = list(csv.DictReader(f))
        assert [int(c["sample"]) for c in calls] == list(range(16))  # the smoke preset's 16 samples
        for name, fraction in (("contaminant", "contaminant_fraction"),
                               ("contaminant_hybrid", "contaminant_fraction_hybrid")):
            assert all(int(c[f"call_{name}"]) == (float(c[f"p_{name}"]) > 0.5) for c in calls)
            called = sum(int(c[f"call_{name}"]) for c in calls)
            assert float(row[fraction]) == pytest.approx(called / 16, abs=1e-3)
    report = (out / "results.md").read_text()
    detector_line = next(line for line in report.splitlines() if line.startswith("- contaminant_fraction: "))
    assert "the last 128 of its 60000, none of which the diffusion models (the first 128) or the classifier " \
           "(the first 512) train on" in detector_line
    assert "recall (share called contaminant) on " in detector_line and "silhouette " in detector_line
    assert next(line for line in report.splitlines() if line.startswith("- contaminant_fraction_hybrid: "))
    assert "  hybrid-aware detector: held-out accuracy " in result.stdout
    assert sorted(p.name for p in (out / "cache").glob("detector*")) == ["detector_noise_heldout.safetensors",
                                                                         "detector_noise_hybrid.safetensors"]
    assert rows[-1]["loss"] in report
    machine = next(line for line in report.splitlines() if line.startswith("- machine: "))  # evidence.py reads it
    assert machine.startswith(f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores, ")
    assert machine.endswith(f" thread(s), torch {torch.__version__}")
    assert "| loss | weighting | settings |" in result.stdout  # the table is printed
    for name in ["samples.png", "influence_histograms.png", "loss_curves.png", "training_data.png", "summary.png",
                 "audit_least_trusted.png", "influence_by_noise_level.png"] + [f"samples_{loss}.png" for loss in SMOKE_LOSSES]:
        assert (out / name).stat().st_size > 1000, name
    # The audit: NED's ranking of the training images, scored against the known contaminated ones.
    with open(out / "audit_ranking_ned.csv", newline="") as f:
        ranking = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in ranking] == list(range(1, 129))  # the smoke preset's 128 training images
    assert sorted(int(r["index"]) for r in ranking) == list(range(128))
    audit_line = next(line for line in report.splitlines() if line.startswith("Audit (the training images ranked "
                                                                               "by ned's mean influence weight"))
    assert "precision at k=" in audit_line and "least-trusted images are contaminated" in audit_line
    assert "audit by ned's influence weights: AUROC" in result.stdout
    assert "Mean influence weight of ned per noise level" in report and "| 900-999 |" in report
    prefix = out / "export" / "ned"
    for suffix in (".torchscript.pt", ".pt2", ".schedule.txt"):
        assert (prefix.parent / (prefix.name + suffix)).is_file()
    for loss in SMOKE_LOSSES:  # periodic checkpoints (3 smoke steps: one per step), so --resume can continue
        state = read_checkpoint(out / "runs" / loss / "checkpoint.safetensors")
        assert state["step"] == 3 and state["config"]["checkpoint_every"] == 1


@needs_fashion_mnist
@pytest.mark.slow
def test_cpp_sampler_on_the_example_export(smoke_run, sampler_binary, tmp_path):
    """The LibTorch sampler on the example's export: required under CI, skipped only where it cannot be built."""
    out, _ = smoke_run
    for variant in ("ddim", "ddpm"):
        _check_cpp_against_python(sampler_binary, out / "export" / "ned", tmp_path, variant=variant)


# In process, as test_example_passes_download_to_the_cifar10_loader runs it: the argument checks come before the
# example touches torch's threads or any data.
@pytest.mark.parametrize("argv, message", [
    (["--losses", "kl", "l2"], "unknown loss 'l2' in 'l2'"),
    (["--contamination", "1.2"], "contamination must be a fraction in [0, 1), got 1.2"),
    (["--losses", "ned", "mse", "ned"], "--losses names a loss twice: ned mse ned"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--temperature", "-1"], "--temperature must be positive, got -1.0"),
    (["--shift", "3"], "--shift and --timestep-sampling apply to --objective flow only"),
    (["--objective", "flow", "--kind", "gaussian", "--losses", "ned+risk_free"], "+risk_free trains DDPM steps"),
])
def test_example_argument_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--out", str(tmp_path), *argv])
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # restored afterwards
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@needs_fashion_mnist
def test_example_missing_dataset_path(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--preset", "smoke", "--out", str(tmp_path / "out"),
                             "--data-root", str(tmp_path / "nowhere")], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and f"Fashion-MNIST directory not found: {tmp_path / 'nowhere'}" in result.stderr
    # A usage error like a bad option's (exit code 2, argparse's "error:" line), not a traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cifar10_contaminated.py: error: Fashion-MNIST directory not found" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar10", "--preset", "quick"], "CIFAR-10 needs --data-root"),
    (["--dataset", "cifar10", "--preset", "quick", "--data-root", "{tmp}/no-cifar"],
     "CIFAR-10 not found: {tmp}/no-cifar/cifar-10-batches-py does not exist"),
])
def test_example_cifar10_data_errors(tmp_path, argv, message):
    if "--data-root" in argv:
        pytest.importorskip("torchvision")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "out"), *argv], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: {message.replace('{tmp}', str(tmp_path))}" in result.stderr
    if "--data-root" in argv:
        assert "(or pass --download to fetch it)" in result.stderr


@pytest.mark.parametrize("download", [False, True])
def test_example_passes_download_to_the_cifar10_loader(tmp_path, monkeypatch, capsys, download):
    """--download reaches load_experiment_data (the train CLI's loader; stubbed here: no test downloads)."""
    calls = []

    def loader(*args, **kwargs):
        calls.append((args, kwargs))
        raise FileNotFoundError("stub loader: stop before any download")

    monkeypatch.setattr(experiment, "load_experiment_data", loader)
    # Options through RD_EXAMPLE_ARGS, which the example reads whether or not it thinks it is in a notebook.
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    monkeypatch.setenv("RD_EXAMPLE_ARGS", f"--dataset cifar10 --preset quick --device cpu "
                       f"--data-root {tmp_path / 'cifar'} --out {tmp_path / 'out'}" + (" --download" * download))
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # restored afterwards
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert exit_info.value.code == 2
    [(args, kwargs)] = calls
    assert args[0] == "cifar10" and kwargs["root"] == str(tmp_path / "cifar") and kwargs["download"] is download
    stderr = capsys.readouterr().err
    assert "error: stub loader: stop before any download" in stderr
    assert ("(or pass --download to fetch it)" in stderr) is not download
