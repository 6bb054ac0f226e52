"""The contaminated-data example end to end, its notebook form, the exports and the LibTorch sampler."""

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subprocess_pythonpath

import robust_diffusion as rd
from robust_diffusion import train as cli
from robust_diffusion.data import FASHION_MNIST_ROOT
from robust_diffusion.export import SCHEDULE_FORMAT, export_model, read_schedule_file
from robust_diffusion.sampling import ddim_sample

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cifar10_contaminated.py"
SAMPLER_SOURCE = REPO / "examples" / "cpp"
HAS_FASHION_MNIST = (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(not HAS_FASHION_MNIST, reason="dataset-fashion-mnist is not installed")
SMOKE_LOSSES = ["kl", "hellinger", "ned", "huber", "clipped_mse", "ned+debias"]


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


def _read_netpbm(path):
    raw = Path(path).read_bytes()
    magic, width, height, maxval, rest = raw.split(maxsplit=4)
    assert magic in (b"P5", b"P6") and maxval == b"255"
    channels = 1 if magic == b"P5" else 3
    pixels = np.frombuffer(rest, dtype=np.uint8)
    assert pixels.size == int(width) * int(height) * channels
    return pixels.reshape(int(height), int(width), channels)


# ---------------------------------------------------------------------------------------------- C++ sampler
@pytest.fixture(scope="session")
def sampler_binary():
    """The rd_sample binary: $RD_SAMPLER, a top-level CMake build's, or built here with CMake (skipped when
    CMake, a C++ compiler or LibTorch's CMake files are missing)."""
    if os.environ.get("RD_SAMPLER"):
        return Path(os.environ["RD_SAMPLER"])
    for candidate in (REPO / "build" / "cmake" / "examples" / "cpp" / "rd_sample",):
        if candidate.is_file():
            return candidate
    cmake = shutil.which("cmake")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    prefix = Path(torch.utils.cmake_prefix_path)
    if not cmake or not compiler or not (prefix / "Torch" / "TorchConfig.cmake").is_file():
        pytest.skip("building the C++ sampler needs cmake, a C++ compiler and LibTorch's CMake files")
    build = REPO / "build" / "rd_sample_test"  # kept between runs: rebuilding is incremental
    for command in ([cmake, "-S", str(SAMPLER_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={prefix}"],
                    [cmake, "--build", str(build), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return build / "rd_sample"


def _check_cpp_against_python(binary, prefix, tmp_path, num_samples=4, steps=3, seed=7):
    """rd_sample's samples must equal Python's ddim_sample with the same model, schedule and seed."""
    out = tmp_path / "cpp_samples"
    result = subprocess.run([str(binary), "--model", f"{prefix}.torchscript.pt", "--schedule",
                             f"{prefix}.schedule.txt", "--out", str(out), "--num-samples", str(num_samples),
                             "--steps", str(steps), "--seed", str(seed)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {num_samples} samples" in result.stdout
    schedule, header = read_schedule_file(f"{prefix}.schedule.txt")
    shape = [int(s) for s in header["image_shape"].split()]
    model = _load_torchscript(f"{prefix}.torchscript.pt")
    expected = ddim_sample(model, schedule, (num_samples, *shape), num_steps=steps,
                           generator=torch.Generator().manual_seed(seed))
    expected = ((expected.double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    suffix = ".pgm" if shape[0] == 1 else ".ppm"
    for i in range(num_samples):
        image = _read_netpbm(out / f"sample_{i:04d}{suffix}")
        assert np.abs(image.astype(int) - expected[i].astype(int)).max() <= 1, i
    grid = _read_netpbm(out / f"grid{suffix}")
    assert grid.shape[2] == shape[0] and grid.shape[0] > shape[1]


# ---------------------------------------------------------------------------------------------- export
def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = cli.build_model("micro", 1)
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
    assert torch.equal(loaded.alphas_cumprod, schedule.alphas_cumprod)  # %.17g round-trips float64 exactly


@pytest.mark.slow
def test_cpp_sampler_matches_python(tmp_path, sampler_binary):
    torch.manual_seed(0)
    model = cli.build_model("micro", 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    paths = export_model(model, tmp_path / "net", (torch.randn(2, 1, 12, 12), torch.tensor([1, 2])),
                         schedule=rd.NoiseSchedule.linear(100))
    _check_cpp_against_python(sampler_binary, tmp_path / "net", tmp_path)
    bad = subprocess.run([str(sampler_binary), "--model", str(tmp_path / "missing.pt"), "--schedule",
                          str(paths["schedule"])], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "model file not found" in bad.stderr
    usage = subprocess.run([str(sampler_binary), "--model", str(paths["torchscript"])], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "--schedule is required" in usage.stderr


# ---------------------------------------------------------------------------------------------- the example
@needs_fashion_mnist
@pytest.mark.slow
def test_example_end_to_end(tmp_path, request):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(EXAMPLE), "--preset", "smoke", "--out", str(out),
                             "--losses", *SMOKE_LOSSES], env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["loss"] for r in rows] == SMOKE_LOSSES + ["data: clean training images",
                                                       "data: contaminated training set"]
    for row in rows[:len(SMOKE_LOSSES)]:
        assert float(row["frechet_distance"]) >= 0 and 0 <= float(row["contaminant_fraction"]) <= 1
        assert 0 <= float(row["auroc"]) <= 1 and "scale=adaptive" in row["settings"]
    assert rows[0]["auroc"] == "0.5"  # plain MSE: every weight is 1
    assert rows[-1]["loss"] in (out / "results.md").read_text()
    assert "| loss | weighting | settings |" in result.stdout  # the table is printed
    for name in ["samples.png", "influence_histograms.png", "loss_curves.png", "training_data.png"] + [
            f"samples_{loss}.png" for loss in SMOKE_LOSSES]:
        assert (out / name).stat().st_size > 1000, name
    prefix = out / "export" / "ned"
    for suffix in (".torchscript.pt", ".pt2", ".schedule.txt"):
        assert (prefix.parent / (prefix.name + suffix)).is_file()
    # The LibTorch sampler on the example's export, when it can be built here.
    try:
        binary = request.getfixturevalue("sampler_binary")
    except pytest.skip.Exception:
        return
    _check_cpp_against_python(binary, prefix, tmp_path)


# Each case starts an interpreter that imports torch (seconds): the CLI tests in test_training.py cover the rest.
@pytest.mark.parametrize("argv, message", [
    (["--losses", "kl", "mse"], "unknown loss 'mse' in 'mse'"),
    (["--contamination", "1.2"], "contamination must be a fraction in [0, 1), got 1.2"),
])
def test_example_argument_errors(tmp_path, argv, message):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path), *argv], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr


@needs_fashion_mnist
def test_example_missing_dataset_path(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--preset", "smoke", "--out", str(tmp_path / "out"),
                             "--data-root", str(tmp_path / "nowhere")], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and f"Fashion-MNIST directory not found: {tmp_path / 'nowhere'}" in result.stderr


# ---------------------------------------------------------------------------------------------- notebook
def _notebook(tmp_path):
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(EXAMPLE)
    path = tmp_path / "cifar10_contaminated.ipynb"
    jupytext.write(notebook, path)
    return jupytext, path


def test_example_converts_to_a_notebook(tmp_path):
    jupytext, path = _notebook(tmp_path)
    notebook = json.loads(path.read_text())
    kinds = [cell["cell_type"] for cell in notebook["cells"]]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 6 and kinds.count("code") >= 6
    # Round trip: the notebook holds exactly the script's cells.
    assert [(c.cell_type, c.source) for c in jupytext.read(path).cells] == [
        (c.cell_type, c.source) for c in jupytext.read(EXAMPLE).cells]


@needs_fashion_mnist
@pytest.mark.slow
def test_notebook_cells_run(tmp_path):
    """Run the notebook's code cells in order, as a Jupyter kernel would: with a real kernel when nbclient and
    ipykernel are installed, otherwise in a fresh interpreter whose argv is a kernel's (``-f kernel.json``),
    the argv that must not reach argparse. Options come from RD_EXAMPLE_ARGS."""
    _, path = _notebook(tmp_path)
    out = tmp_path / "out"
    env = _env(RD_EXAMPLE_ARGS=f"--preset smoke --losses kl ned --out {out}")
    try:
        import ipykernel  # noqa: F401
        import nbclient
        import nbformat
    except ImportError:
        runner = tmp_path / "run_cells.py"
        runner.write_text(
            "import json, sys\n"
            "sys.argv = ['/usr/lib/python3/dist-packages/ipykernel_launcher.py', '-f', '/tmp/kernel-1234.json']\n"
            f"cells = json.load(open({str(path)!r}))['cells']\n"
            "namespace = {'__name__': '__main__'}\n"
            "for i, cell in enumerate(c for c in cells if c['cell_type'] == 'code'):\n"
            "    print(f'--- cell {i}', flush=True)\n"
            "    exec(compile(''.join(cell['source']), f'<cell {i}>', 'exec'), namespace)\n")
        result = subprocess.run([sys.executable, str(runner)], env=env, capture_output=True, text=True,
                                timeout=900, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    else:
        notebook = nbformat.read(path, as_version=4)
        old = dict(os.environ)
        os.environ.update(env)
        try:
            nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                    resources={"metadata": {"path": str(tmp_path)}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(old)
    assert (out / "results.md").is_file() and (out / "export" / "ned.torchscript.pt").is_file()
