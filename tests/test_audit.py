"""The data audit (python -m robust_diffusion.audit), the shared loaders of your own images, and
python -m robust_diffusion.train --dataset folder. Tiny budgets: a few steps of the micro UNet on 8x8 images."""

import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_pythonpath
import robust_diffusion as rd
from robust_diffusion.training import audit_command, audit_report, train_command
from robust_diffusion.training.data import load_array_file, load_image_folder, load_images
from robust_diffusion.training.trainer_checkpoint import read_checkpoint

Image = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "micro", "--steps", "4", "--batch-size", "8", "--image-size", "8", "--show", "4", "--no-progress",
        "--device", "cpu"]


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _folder(root, n_grey=10, n_rgb=6, corrupt=True):
    """Grey PNGs of 12x12, RGB JPEGs of 20x14 in a subfolder, one file that is not an image, one text file."""
    rng = np.random.default_rng(0)
    for i in range(n_grey):
        _save(root / f"grey_{i:02d}.png", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    for i in range(n_rgb):
        _save(root / "colour" / f"rgb_{i:02d}.jpg", rng.integers(0, 256, (14, 20, 3), dtype=np.uint8))
    if corrupt:
        (root / "broken.png").write_bytes(b"not an image")
    (root / "README.txt").write_text("not an image either")
    return root


def _run(argv, capsys):
    code = audit_command.main(argv)
    return code, capsys.readouterr()


def _ranking(out):
    with open(out / "ranking.csv", newline="") as f:
        return list(csv.DictReader(f))


def _usage_error(argv, capsys, main=audit_command.main):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in error
    return error


# ---------------------------------------------------------------------------------------------- loaders
def test_folder_loader_mixed_sizes_grey_and_colour_and_a_corrupt_file(tmp_path):
    root = _folder(tmp_path / "data")
    loaded = load_image_folder(root, 8)
    assert loaded.images.shape == (16, 3, 8, 8) and loaded.images.dtype == torch.float32
    assert -1 <= float(loaded.images.min()) and float(loaded.images.max()) <= 1
    assert loaded.paths == sorted(loaded.paths) and len(loaded.paths) == 16
    assert [p for p, _ in loaded.unreadable] == [str(root / "broken.png")]
    assert "UnidentifiedImageError" in loaded.unreadable[0][1]
    notes = " | ".join(loaded.notes)
    for part in ("17 image files", "16 read, 1 unreadable", "1 other file(s) ignored", "mixed sizes: 2 different sizes",
                 "10 greyscale and 6 colour", "greyscale images repeated over RGB"):
        assert part in notes, part
    # A grey image repeated over RGB: its three channels are equal.
    grey = loaded.paths.index(str(root / "grey_00.png"))
    assert torch.equal(loaded.images[grey, 0], loaded.images[grey, 2])
    grey = load_image_folder(root, 8, channels=1)
    assert grey.images.shape == (16, 1, 8, 8) and "colour images converted to grey" in " ".join(grey.notes)
    only_grey = load_image_folder(_folder(tmp_path / "grey", n_rgb=0, corrupt=False), 8)
    assert only_grey.images.shape[1] == 1 and not only_grey.unreadable


def test_folder_loader_keeps_pixel_values(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _save(tmp_path / "a.png", pixels)
    loaded = load_image_folder(tmp_path, 8)
    torch.testing.assert_close(loaded.images[0, 0], torch.from_numpy(pixels).float() / 127.5 - 1)
    assert "used as they are" in " ".join(loaded.notes)


def test_folder_loader_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no images found in {tmp_path / 'empty'}"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="none of the 1 image files in .*broken could be read"):
        load_image_folder(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "missing")


def test_folder_of_class_sub_folders_gives_imagefolder_labels(tmp_path):
    """torchvision's ImageFolder layout: each image's label is its sub-folder's index among the sorted names, at any
    depth below it; a folder with images of its own has no labels."""
    rng = np.random.default_rng(0)
    counts = {"zebra": 2, "apple": 3, "mango": 1}
    for name, count in counts.items():
        for i in range(count):
            _save(tmp_path / "classes" / name / ("deep" if i else "") / f"{i}.png",
                  rng.integers(0, 256, (8, 8), dtype=np.uint8))
    loaded = load_images(tmp_path / "classes", 8)
    assert loaded.classes == ("apple", "mango", "zebra")
    assert loaded.labels.dtype == torch.int64 and loaded.labels.shape == (6,)
    for path, label in zip(loaded.paths, loaded.labels.tolist()):
        assert Path(path).relative_to(tmp_path / "classes").parts[0] == loaded.classes[label]
    assert torch.bincount(loaded.labels).tolist() == [3, 1, 2]
    assert "3 classes from the sub-folders" in loaded.notes[-1] and "0 'apple' (3)" in loaded.notes[-1]
    datasets = pytest.importorskip("torchvision.datasets")
    reference = datasets.ImageFolder(str(tmp_path / "classes"))
    assert tuple(reference.classes) == loaded.classes
    assert sorted((str(Path(p)), k) for p, k in reference.samples) == sorted(zip(loaded.paths, loaded.labels.tolist()))
    unlabelled = load_image_folder(_folder(tmp_path / "mixed", n_grey=2, n_rgb=2, corrupt=False), 8)
    assert unlabelled.labels is None and unlabelled.classes == ()


def test_npz_labels_are_read_without_pickle_and_checked(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "labelled.npz", images=images, labels=np.array([2, 0, 1, 2]))
    loaded = load_array_file(tmp_path / "labelled.npz")
    assert loaded.labels.tolist() == [2, 0, 1, 2] and loaded.labels.dtype == torch.int64
    assert loaded.classes == ("0", "1", "2") and "3 classes" in loaded.notes[-1]
    np.savez(tmp_path / "unnamed.npz", pixels=images, labels=np.array([0.0, 1.0, 1.0, 0.0]))  # whole floats count
    assert load_array_file(tmp_path / "unnamed.npz").labels.tolist() == [0, 1, 1, 0]
    assert load_array_file(tmp_path / "labelled.npz").images.shape == (4, 1, 5, 5)
    np.save(tmp_path / "plain.npy", images)
    assert load_array_file(tmp_path / "plain.npy").labels is None
    for name, labels, message in [("short", np.array([0, 1]), r"one integer class label per image, shape \(4,\)"),
                                  ("halves", np.array([0.5, 1, 1, 0]), "not whole numbers"),
                                  ("negative", np.array([0, -1, 1, 0]), "non-negative class indices, got -1")]:
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)
        with pytest.raises(ValueError, match=message):
            load_array_file(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "objects.npz", images=images, labels=np.array([0, "a", None, 1], dtype=object))
    with pytest.raises(ValueError, match=r"cannot read images from .*objects.npz \(Object arrays cannot be loaded"):
        load_array_file(tmp_path / "objects.npz")  # allow_pickle=False: refused unopened


def test_contaminated_dataset_carries_labels_and_keeps_its_items(tmp_path):
    from robust_diffusion.training.data import ContaminatedDataset, contaminate
    from robust_diffusion.training.experiment import load_experiment_data
    images, labels = torch.rand(10, 1, 4, 4) * 2 - 1, torch.arange(10) % 3
    dataset = contaminate(images, 0.3, "noise", labels=labels)
    assert torch.equal(dataset.labels, labels)
    image, flag, risk, index = dataset[4]  # the item layout every caller unpacks
    assert image.shape == (1, 4, 4) and index == 4
    assert contaminate(images, 0.3, "noise").labels is None
    with pytest.raises(ValueError, match=r"labels must be integer class labels, one per image \[10\]"):
        contaminate(images, 0.3, labels=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be non-negative class indices, got -1"):
        ContaminatedDataset(images, torch.zeros(10, dtype=torch.bool), torch.zeros(10), "noise", 0.0,
                            labels=-torch.ones(10, dtype=torch.int64))
    np.savez(tmp_path / "data.npz", images=(images[:, 0].numpy() + 1) / 2, labels=labels.numpy())
    data = load_experiment_data("folder", 0.2, root=tmp_path / "data.npz")
    assert data.num_classes == 3 and torch.equal(data.train.labels, labels) and torch.equal(data.train_labels, labels)
    np.save(tmp_path / "plain.npy", (images[:, 0].numpy() + 1) / 2)
    plain = load_experiment_data("folder", 0.2, root=tmp_path / "plain.npy")
    assert plain.num_classes is None and plain.train.labels is None


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
@pytest.mark.parametrize("kind", ["uint8", "unit", "symmetric"])
def test_array_loader_layouts_and_value_ranges(tmp_path, layout, kind):
    rng = np.random.default_rng(0)
    channels = 1 if layout == "NHW" else 3
    unit = rng.random((5, channels, 6, 7)).astype(np.float32)
    unit[0, 0, 0, 0], unit[0, 0, 0, 1] = 0.0, 1.0
    stored = {"uint8": np.round(unit * 255).astype(np.uint8), "unit": unit, "symmetric": unit * 2 - 1}[kind]
    stored = {"NHW": stored[:, 0], "NHWC": stored.transpose(0, 2, 3, 1), "NCHW": stored}[layout]
    path = tmp_path / "images.npy"
    np.save(path, stored)
    loaded = load_array_file(path)
    assert loaded.images.shape == (5, channels, 6, 7) and loaded.paths == [] and loaded.unreadable == []
    expected = torch.from_numpy(np.round(unit * 255) / 255 if kind == "uint8" else unit) * 2 - 1
    torch.testing.assert_close(loaded.images, expected.float(), atol=1e-6, rtol=0)
    said = {"uint8": "0..255 (uint8", "unit": "floats read as [0, 1]", "symmetric": "floats read as [-1, 1]"}[kind]
    assert said in loaded.notes[0] and f"layout [{', '.join(layout)}]" in loaded.notes[0]
    resized = load_array_file(path, image_size=4, channels=3)
    assert resized.images.shape == (5, 3, 4, 4) and "centre-cropped to 4x4" in resized.notes[-1]


def test_array_loader_npz_and_idx(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", images)
    np.savez(tmp_path / "named.npz", labels=np.zeros(4), images=images)
    for name in ("one.npz", "named.npz"):
        assert torch.equal(load_array_file(tmp_path / name).images, load_array_file(tmp_path / "one.npz").images)
    np.savez(tmp_path / "two.npz", a=images, b=images)
    with pytest.raises(ValueError, match=r"holds the arrays \['a', 'b'\]: keep one, or name the images 'images'"):
        load_array_file(tmp_path / "two.npz")
    idx = tmp_path / "images-idx3-ubyte.gz"
    _write_idx(idx, images)
    loaded = load_images(idx)
    assert loaded.images.shape == (4, 1, 5, 5) and "IDX file" in loaded.notes[0]
    torch.testing.assert_close(loaded.images[:, 0], torch.from_numpy(images).float() / 127.5 - 1)


@pytest.mark.parametrize("array, message", [
    (np.full((3, 4, 4), np.nan, dtype=np.float32), "48 non-finite value"),
    (np.full((3, 4, 4), 300.0, dtype=np.float32), r"values in \[300, 300\]; expected uint8"),
    (np.full((3, 4, 4), 300, dtype=np.int32), r"integer values in \[300, 300\]; expected 0..255"),
    (np.zeros((3, 16)), r"shape \(3, 16\) is not a stack of images"),
    (np.zeros((3, 4, 4, 5)), r"shape \(3, 4, 4, 5\) is not a stack of images"),
    (np.zeros((0, 4, 4)), "holds no images"),
    (np.zeros((3, 4, 4), dtype=bool), "dtype bool is not pixels"),
])
def test_array_loader_errors(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError, match=message):
        load_array_file(tmp_path / "x.npy")


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# ---------------------------------------------------------------------------------------------- the audit
def test_audit_of_a_folder_writes_the_ranking_figures_and_report(tmp_path, capsys):
    root, out = _folder(tmp_path / "data"), tmp_path / "out"
    code, printed = _run([str(root), "--out", str(out)] + TINY, capsys)
    assert code == 0
    assert "1 unreadable image file(s) left out: " + str(root / "broken.png") in printed.out
    for name in ("ranking.csv", "report.md", "least_trusted.png", "most_trusted.png", "influence_hist.png",
                 "checkpoint.safetensors", "log.csv", "audit.json"):
        assert (out / name).is_file(), name
    rows = _ranking(out)
    assert list(rows[0]) == list(audit_report.RANKING_COLUMNS)
    assert [int(r["rank"]) for r in rows] == list(range(1, 17))
    assert sorted(int(r["index"]) for r in rows) == list(range(16))
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in root.rglob("*.*")
                                                      if p.suffix in (".png", ".jpg") and p.name != "broken.png")
    seen = [r for r in rows if int(r["times_seen"]) > 0]
    assert sum(int(r["times_seen"]) for r in rows) == 4 * 8 - 0  # every draw from step 0 (4 // 5) counted
    weights = [float(r["mean_influence"]) for r in seen]
    # relative to a typical image (1): NED at temperature 1 gives an image easier than typical up to 1 / 0.44
    ceiling = 1 / rd.RobustDiffusionLoss("ned").typical_influence
    assert weights == sorted(weights) and all(0 <= w <= ceiling for w in weights)
    assert all(r["mean_influence"] == "" for r in rows if int(r["times_seen"]) == 0)  # empty, never NaN text
    report = (out / "report.md").read_text()
    for part in ("16 images used, each 3 x 8 x 8", "mixed sizes", "**1 unreadable image file(s)**",
                 f"`{root / 'broken.png'}`: UnidentifiedImageError", "loss: ned (scale=adaptive",
                 "budget: 4 steps of 8",
                 "## How to read it", "| rank | file | mean influence"):
        assert part in report, part


def test_audit_of_an_npz_and_an_idx_file(tmp_path, capsys):
    images = np.random.default_rng(1).random((16, 8, 8, 1)).astype(np.float32) * 2 - 1
    np.savez(tmp_path / "data.npz", images=images)
    code, printed = _run([str(tmp_path / "data.npz"), "--out", str(tmp_path / "npz")] + TINY, capsys)
    assert code == 0 and "floats read as [-1, 1]" in printed.out
    rows = _ranking(tmp_path / "npz")
    assert {r["file"] for r in rows} == {""} and len(rows) == 16
    _write_idx(tmp_path / "data-idx3-ubyte.gz", np.round((images[..., 0] + 1) * 127.5))
    code, printed = _run([str(tmp_path / "data-idx3-ubyte.gz"), "--out", str(tmp_path / "idx")] + TINY, capsys)
    assert code == 0 and "IDX file" in (tmp_path / "idx" / "report.md").read_text()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "no images found in {p}"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "no images found in {p}: .*1 other file"),
    (lambda p: (p.mkdir(), (p / "a.png").write_bytes(b"not an image")), "none of the 1 image files in {p}"),
    (lambda p: None, "{p} does not exist"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 3))), r"is not a stack of images"),
], ids=["empty folder", "no image files", "all unreadable", "missing", "not images"])
def test_audit_of_bad_data_is_a_one_line_usage_error(tmp_path, capsys, make, message):
    path = tmp_path / "data"
    make(path)
    if not path.exists() and path.with_suffix(".npy").exists():
        path = path.with_suffix(".npy")
    error = _usage_error([str(path), "--out", str(tmp_path / "out")] + TINY, capsys)
    assert __import__("re").search(message.format(p=path), error), error
    assert error.startswith("python -m robust_diffusion.audit: error: ")


def test_audit_resume_continues_and_refuses_other_data(tmp_path, capsys):
    images = np.random.default_rng(2).integers(0, 256, (16, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    out = tmp_path / "out"
    assert _run([str(tmp_path / "a.npy"), "--out", str(out)] + TINY, capsys)[0] == 0
    longer = [a if a != "4" else "8" for a in TINY]  # --steps 8
    code, printed = _run([str(tmp_path / "a.npy"), "--out", str(out), "--resume"] + longer, capsys)
    assert code == 0 and f"resumed from {out / 'checkpoint.safetensors'} at step 4" in printed.out
    assert read_checkpoint(out / "checkpoint.safetensors")["step"] == 8
    assert sum(int(r["times_seen"]) for r in _ranking(out)) == 8 * 8
    assert "budget: 8 steps of 8" in (out / "report.md").read_text()
    np.save(tmp_path / "b.npy", images[::-1].copy())
    error = _usage_error([str(tmp_path / "b.npy"), "--out", str(out), "--resume"] + longer, capsys)
    assert "was trained on other data" in error
    code, printed = _run([str(tmp_path / "a.npy"), "--out", str(tmp_path / "fresh"), "--resume"] + TINY, capsys)
    assert code == 0 and "no checkpoint in" in printed.out


def test_audit_with_flow_matching_and_a_resume_that_changes_the_objective(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(3).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    out = tmp_path / "out"
    flow = ["--objective", "flow", "--shift", "3"]
    code, printed = _run([str(tmp_path / "a.npy"), "--out", str(out)] + TINY + flow, capsys)
    assert code == 0 and "training: flow matching (velocity target, shift 3, uniform timesteps)" in printed.out
    assert sum(int(r["times_seen"]) for r in _ranking(out)) == 4 * 8
    assert "- objective: flow matching" in (out / "report.md").read_text()
    longer = [a if a != "4" else "8" for a in TINY]
    code, printed = _run([str(tmp_path / "a.npy"), "--out", str(out), "--resume"] + longer + flow, capsys)
    assert code == 0 and "at step 4" in printed.out
    # Resuming the flow audit as DDPM (the default objective) would train another model on the same weights.
    error = _usage_error([str(tmp_path / "a.npy"), "--out", str(out), "--resume"] + longer, capsys)
    assert "it trained with a FlowMatchingSchedule, this run has a NoiseSchedule" in error
    error = _usage_error([str(tmp_path / "a.npy"), "--out", str(out), "--shift", "2"] + TINY, capsys)
    assert "--shift and --timestep-sampling apply to --objective flow only" in error


def test_audit_without_matplotlib_writes_plain_grids_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    np.save(tmp_path / "a.npy", np.random.default_rng(3).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    code, printed = _run([str(tmp_path / "a.npy"), "--out", str(tmp_path / "out")] + TINY, capsys)
    assert code == 0 and "influence_hist.png" in printed.out
    out = tmp_path / "out"
    assert not (out / "influence_hist.png").exists()
    grid = Image.open(out / "least_trusted.png")
    assert grid.size == (4 * 10, 10) and grid.mode == "RGB"  # 4 images of 8x8 with 2-pixel gaps
    report = (out / "report.md").read_text()
    assert "`influence_hist.png`: not written: it needs matplotlib" in report
    assert "without captions (written without matplotlib" in report


def test_audit_of_a_folder_without_pillow_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    root = _folder(tmp_path / "data", corrupt=False)
    monkeypatch.setitem(sys.modules, "PIL", None)
    error = _usage_error([str(root), "--out", str(tmp_path / "out")] + TINY, capsys)
    assert "reading a folder of images needs Pillow: pip install pillow" in error


def test_audit_labels_errors(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((16, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "short.npy", np.zeros(15))
    np.save(tmp_path / "twos.npy", np.full(16, 2))
    out = ["--out", str(tmp_path / "out")]
    assert "expected 16 flags (one per image), got shape (15,)" in _usage_error(
        [str(tmp_path / "a.npy"), *out, "--labels", str(tmp_path / "short.npy")] + TINY, capsys)
    assert "flags must be 0 or 1" in _usage_error(
        [str(tmp_path / "a.npy"), *out, "--labels", str(tmp_path / "twos.npy")] + TINY, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_audit_finds_planted_noise_images(tmp_path, capsys, objective):
    """64 8x8 discs, 6 replaced by noise; 120 steps of the micro UNet (seconds): the noise images rank first,
    with DDPM and with flow matching."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    images = np.zeros((64, 8, 8), dtype=np.uint8)
    for i in range(64):
        (cy, cx), r = rng.uniform(2.5, 4.5, 2), rng.uniform(1.5, 2.5)
        images[i] = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) * 200
    flags = np.zeros(64, dtype=np.uint8)
    planted = rng.choice(64, 6, replace=False)
    flags[planted] = 1
    images[planted] = rng.integers(0, 256, (6, 8, 8))
    np.save(tmp_path / "data.npy", images)
    np.save(tmp_path / "labels.npy", flags)
    out = tmp_path / "out"
    code, printed = _run([str(tmp_path / "data.npy"), "--out", str(out), "--model", "micro", "--steps", "120",
                          "--batch-size", "16", "--no-progress", "--device", "cpu", "--objective", objective,
                          "--labels", str(tmp_path / "labels.npy")], capsys)
    assert code == 0
    line = next(line for line in printed.out.splitlines() if line.startswith("against --labels: AUROC "))
    assert float(line.split()[3].rstrip(",")) >= 0.85, line
    top = [int(r["index"]) for r in _ranking(out)[:6]]
    assert len(set(top) & set(planted.tolist())) >= 3, top
    report = (out / "report.md").read_text()
    assert "## Against the given labels" in report and "6 of 64 images flagged" in report
    assert "## Classes" not in report  # the array has no class labels


@pytest.mark.slow
def test_audit_pairs_finds_swapped_labels_and_names_the_right_one(tmp_path, capsys):
    """--pairs on an .npz of three shapes (discs, bars, rings) with 6 of 72 labels swapped: a class-conditional micro
    UNet (seconds), then every pair scored; the swapped pairs rank first, with their true class preferred."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    truth = np.arange(72) % 3
    images = np.zeros((72, 8, 8), dtype=np.uint8)
    for i, kind in enumerate(truth):
        cy, cx = rng.uniform(3, 4.5, 2)
        radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        shape = radius < 2.5 if kind == 0 else (abs(xx - cx) < 1) if kind == 1 else (abs(radius - 2.5) < 0.8)
        images[i] = shape * 220
    labels = truth.copy()
    swapped = np.zeros(72, dtype=np.uint8)
    swapped[rng.choice(72, 6, replace=False)] = 1
    labels[swapped == 1] = (truth[swapped == 1] + 1) % 3
    np.savez(tmp_path / "shapes.npz", images=images, labels=labels)
    np.save(tmp_path / "swapped.npy", swapped)
    out = tmp_path / "out"
    code, printed = _run([str(tmp_path / "shapes.npz"), "--out", str(out), "--pairs", "--model", "micro", "--steps",
                          "200", "--batch-size", "24", "--no-progress", "--device", "cpu",
                          "--labels", str(tmp_path / "swapped.npy")], capsys)
    assert code == 0, printed.err
    with open(out / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == [str(i + 1) for i in range(72)]
    top = {int(r["index"]) for r in rows[:6]}
    assert len(top & set(np.flatnonzero(swapped).tolist())) >= 4, rows[:8]
    right = [r["preferred"] == str(truth[int(r["index"])]) for r in rows if swapped[int(r["index"])]]
    assert sum(right) >= 4, rows[:8]
    line = next(line for line in printed.out.splitlines() if line.startswith("pairs against --labels: "))
    assert "margin AUROC" in line and "confident learning (baseline) AUROC" in line
    report = (out / "report.md").read_text()
    assert "## Mismatched pairs (`--pairs`)" in report and "## Classes" in report
    assert (out / "suspected_pairs.png").stat().st_size > 1000
    # without labels there are no pairs to rank
    np.save(tmp_path / "plain.npy", images)
    error = _usage_error([str(tmp_path / "plain.npy"), "--out", str(tmp_path / "o2"), "--pairs", "--steps", "2"],
                         capsys)
    assert "--pairs ranks (image, label) pairs, and" in error and "has no labels" in error


def test_class_ranks_call_out_a_rare_class_among_the_least_trusted():
    """A class that is 5% of the data but most of the least-trusted tenth is named, with what to do; a common
    class, or a rare one ranked like the rest, is not."""
    labels = torch.tensor([0] * 90 + [1] * 5 + [2] * 5)
    order = [90, 91, 92, 93, 0, 1, 2, 3, 4, 5] + list(range(6, 90)) + [94, 95, 96, 97, 98, 99]  # class 1 first
    table = [{"rank": r + 1, "index": i, "times_seen": 3} for r, i in enumerate(order)]
    found = audit_report.class_ranks(table, labels, ("common", "rare", "rare but typical"))
    rows = {row["class"]: row for row in found["rows"]}
    assert found["tenth"] == 10 and rows["rare"]["least_trusted_share"] == 0.4 and rows["rare"]["share"] == 0.05
    assert rows["rare"]["median_rank"] < 0.05 and rows["rare but typical"]["median_rank"] > 0.9
    assert len(found["warnings"]) == 1 and "class 'rare' is 5.0% of the data but 40% of the least-trusted tenth" \
        in found["warnings"][0] and "+coherent" in found["warnings"][0]


# ---------------------------------------------------------------------------------------------- the training CLI
def test_train_cli_on_a_folder(tmp_path, capsys):
    root, out = _folder(tmp_path / "data"), tmp_path / "out"
    code = train_command.main(["--dataset", "folder", "--data-root", str(root), "--out", str(out), "--model", "micro",
                     "--steps", "2", "--batch-size", "8", "--image-size", "8", "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"{root} (3x8x8), 16 training images, none replaced (no contamination)" in printed
    assert "mixed sizes" in printed and "1 unreadable image file(s) left out" in printed
    assert (out / "unreadable.txt").read_text().startswith(str(root / "broken.png") + "\t")
    assert "AUROC" not in printed  # nothing is contaminated: no detector to score
    saved = load_file(out / "influence.safetensors")
    assert saved["mean_influence"].shape == (16,) and not saved["is_contaminated"].any()


def test_train_cli_folder_errors_and_the_contamination_default(tmp_path, capsys):
    assert train_command.build_parser().get_default("contamination") == 0.0
    base = ["--out", str(tmp_path / "out"), "--model", "micro", "--steps", "1", "--no-progress"]
    assert "--dataset folder needs --data-root" in _usage_error(["--dataset", "folder"] + base, capsys, train_command.main)
    (tmp_path / "empty").mkdir()
    error = _usage_error(["--dataset", "folder", "--data-root", str(tmp_path / "empty")] + base, capsys, train_command.main)
    assert f"no images found in {tmp_path / 'empty'}" in error
    root = _folder(tmp_path / "data", corrupt=False)
    error = _usage_error(["--dataset", "folder", "--data-root", str(root), "--contamination", "0.2",
                          "--kind", "dataset"] + base, capsys, train_command.main)
    assert "contamination kind 'dataset'" in error


def test_ctrl_c_stops_after_the_step_writes_the_ranking_so_far_and_resume_continues(tmp_path):
    """SIGINT during the audit: no traceback; it stops after the current step, writes a checkpoint there, the ranking
    and report of what it has seen so far, says how to continue, and exits 130; --resume finishes the run."""
    import signal
    import time

    images = np.random.default_rng(3).integers(0, 256, (32, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "robust_diffusion.audit", str(tmp_path / "a.npy"), "--out", str(out), "--model",
            "micro", "--steps", "100000", "--batch-size", "8", "--show", "4", "--no-progress", "--device", "cpu",
            "--threads", "1", "--score-from-step", "0", "--checkpoint-every", "100000"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "log.csv").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first log row: training is under way
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "stopping after this step" in stderr
    step = read_checkpoint(out / "checkpoint.safetensors")["step"]
    assert 50 <= step < 100000 and f"interrupted at step {step} of 100000" in stdout
    rows = _ranking(out)
    assert len(rows) == 32 and sum(int(r["times_seen"]) for r in rows) == 8 * step
    assert f"budget: {step} steps of 8" in (out / "report.md").read_text()
    argv[argv.index("--steps") + 1] = str(step + 4)
    resumed = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resumed from {out / 'checkpoint.safetensors'} at step {step}" in resumed.stdout
    assert sum(int(r["times_seen"]) for r in _ranking(out)) == 8 * (step + 4)


@pytest.mark.parametrize("command, script", [(audit_command, "robust-diffusion-audit"),
                                             (train_command, "robust-diffusion-train")])
def test_help_shows_every_option_with_a_line_and_its_default(command, script, monkeypatch):
    from robust_diffusion.training.arguments import default_threads

    parser = command.build_parser()
    for action in parser._actions:
        if action.option_strings:
            assert action.help, f"{action.option_strings} has no help line"
    text = " ".join(parser.format_help().split())
    for option, default in (("--steps", 2000 if command is train_command else 1000),
                            ("--batch-size", 64), ("--lr", 0.0002 if command is train_command else 0.002)):
        assert f"{option} {option[2:].upper().replace('-', '_')}" in text and f"(default: {default})" in text, option
    assert parser.prog.startswith("python -m robust_diffusion.")
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}"])
    assert command.build_parser().prog == script  # robust-diffusion-train --help names itself
    if command is audit_command:
        assert parser.get_default("threads") == default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
        assert parser.get_default("checkpoint_every") == 200


def test_python_dash_m_robust_diffusion_lists_the_commands():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-m", "robust_diffusion"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("python -m robust_diffusion.train", "robust-diffusion-train", "python -m robust_diffusion.audit",
                 "robust-diffusion-audit"):
        assert name in result.stdout


def test_the_audit_extra_declares_what_the_audit_reads_and_draws_with():
    import tomllib

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert {"pillow", "matplotlib"} <= {name.lower() for name in extras["audit"]}


def test_entry_points_expose_main():
    import robust_diffusion.audit
    import robust_diffusion.train

    assert robust_diffusion.audit.main is audit_command.main and robust_diffusion.train.main is train_command.main
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-m", "robust_diffusion.audit", "--help"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--labels" in result.stdout and "ranking" in result.stdout
