"""Tests for robust_diffusion.training.data: IDX reading, Fashion-MNIST / CIFAR-10 loading, contamination."""

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from robust_diffusion.training import data
from robust_diffusion.training.data import (CONTAMINATION_KINDS, FASHION_MNIST_ROOT, ContaminatedDataset, contaminate,
                                   fashion_mnist_root, load_cifar10, load_fashion_mnist, read_idx, to_unit_range)

FASHION_TEST_IMAGES = FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz"
needs_fashion_mnist = pytest.mark.skipif(not FASHION_TEST_IMAGES.is_file(),
                                         reason="Debian's dataset-fashion-mnist is not installed")


def _write_idx(path, array: np.ndarray, type_code: int, compress: bool) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(payload)


# ---------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_big_endian_int32(tmp_path, compress):
    values = (np.arange(-3, 3).reshape(2, 3) * 1000).astype(">i4")
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(path, values, 0x0C, compress)
    out = read_idx(path)
    assert out.dtype == torch.int32 and out.shape == (2, 3)
    assert out.tolist() == values.astype(np.int32).tolist()


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], dtype=">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match=r"declares shape \(5,\)"):
        read_idx(short)


@needs_fashion_mnist
def test_read_idx_debian_fashion_mnist():
    images = read_idx(FASHION_TEST_IMAGES)
    labels = read_idx(FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.uint8
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert torch.bincount(labels.long()).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
@needs_fashion_mnist
@pytest.mark.parametrize("pad_to", [32, None])
def test_load_fashion_mnist(pad_to):
    images, labels = load_fashion_mnist("test", pad_to=pad_to)
    size = 28 if pad_to is None else 32
    assert images.shape == (10000, 1, size, size) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    raw = to_unit_range(read_idx(FASHION_TEST_IMAGES)[:5])
    if pad_to is None:
        torch.testing.assert_close(images[:5, 0], raw, rtol=0, atol=0)
    else:
        torch.testing.assert_close(images[:5, 0, 2:30, 2:30], raw, rtol=0, atol=0)
        border = torch.ones(images.shape[-2:], dtype=torch.bool)
        border[2:30, 2:30] = False
        assert (images[:, 0][:, border] == -1.0).all()


def test_load_fashion_mnist_missing_files_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_load_fashion_mnist_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8), 0x08, True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((2,), np.uint8), 0x08, False)
    assert load_fashion_mnist("test", root=tmp_path).images.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="pad_to must be an integer >= 28"):
        load_fashion_mnist("test", root=tmp_path, pad_to=20)


def _fake_fashion_mnist(root, n=3):
    root.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), 255, np.uint8), 0x08, True)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8), 0x08, True)


def _fake_dpkg(monkeypatch, stdout="", returncode=0, error=None):
    """Replace subprocess.run for robust_diffusion.training.data; returns the list of commands it was called with."""
    calls = []

    def run(command, **kwargs):
        calls.append(list(command))
        if error is not None:
            raise error
        return subprocess.CompletedProcess(command, returncode, stdout=stdout, stderr="")

    monkeypatch.setattr(data.subprocess, "run", run)
    return calls


def test_fashion_mnist_found_through_dpkg_when_the_default_path_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", tmp_path / "usr" / "share" / "datasets" / "fashion-mnist")
    elsewhere = tmp_path / "opt" / "fashion"
    _fake_fashion_mnist(elsewhere)
    listing = "\n".join(["/.", "/usr/share/doc/dataset-fashion-mnist", str(elsewhere)] +
                         [str(path) for path in sorted(elsewhere.iterdir())]) + "\n"
    calls = _fake_dpkg(monkeypatch, stdout=listing)
    assert fashion_mnist_root() == elsewhere
    assert calls == [["dpkg", "-L", "dataset-fashion-mnist"]]
    images, labels = load_fashion_mnist("test", pad_to=None)  # root=None: the default goes through dpkg too
    assert images.shape == (3, 1, 28, 28) and (images == 1.0).all() and labels.tolist() == [0, 1, 2]


def test_fashion_mnist_default_path_does_not_ask_dpkg(tmp_path, monkeypatch):
    root = tmp_path / "fashion"
    _fake_fashion_mnist(root)
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", root)
    calls = _fake_dpkg(monkeypatch, error=AssertionError("dpkg must not run when the default path has the files"))
    assert fashion_mnist_root() == root and calls == []


@pytest.mark.parametrize("dpkg", [dict(error=FileNotFoundError("dpkg")),  # not a Debian system
                                  dict(returncode=1, stdout=""),  # package not installed
                                  dict(stdout="/.\n/usr/share/doc/dataset-fashion-mnist\n")])  # no IDX files listed
def test_fashion_mnist_without_the_package_says_how_to_install(tmp_path, monkeypatch, dpkg):
    default = tmp_path / "missing"
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", default)
    calls = _fake_dpkg(monkeypatch, **dpkg)
    assert fashion_mnist_root() == default and len(calls) == 1
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")


# ---------------------------------------------------------------------------------------------- CIFAR-10
def _write_fake_cifar10(root, per_batch: int = 2):
    """The python-pickle layout of cifar-10-python.tar.gz with a few images per batch file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        for i in range(per_batch):
            data[i, :1024], data[i, 1024:2048], data[i, 2048:] = 10 * b + i, 100, 255  # R, G, B planes
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [(b + i) % 10 for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_load_cifar10_from_fake_directory(tmp_path, monkeypatch):
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    _write_fake_cifar10(tmp_path)
    # The fake files cannot match the real archive's md5 sums: check only that they exist.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    train_images, train_labels = load_cifar10(tmp_path, "train")
    assert train_images.shape == (10, 3, 32, 32) and train_images.dtype == torch.float32
    assert train_labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    torch.testing.assert_close(train_images[3, :, 5, 7], to_unit_range(torch.tensor([11, 100, 255])))
    test_images, test_labels = load_cifar10(tmp_path, "test")
    assert test_images.shape == (2, 3, 32, 32) and test_labels.tolist() == [5, 6]
    assert test_images[1, 0].unique().tolist() == [to_unit_range(torch.tensor(51)).item()]


def test_load_cifar10_missing_data(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py does not exist.*download=True"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_cifar10(tmp_path, "val")


def test_load_cifar10_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------- contamination
def _clean_images(n: int = 40, size: int = 8) -> torch.Tensor:
    return torch.linspace(-0.9, 0.9, n).reshape(n, 1, 1, 1).expand(n, 1, size, size).contiguous()


@pytest.mark.parametrize("kind", CONTAMINATION_KINDS)
@pytest.mark.parametrize("n, fraction", [(40, 0.0), (40, 0.1), (37, 0.3), (10, 0.25), (7, 0.4)])
def test_contaminate_exact_count_and_clean_samples_untouched(kind, n, fraction):
    images = _clean_images(n)
    original = images.clone()
    contaminant = -torch.ones(50, 1, 8, 8)
    data = contaminate(images, fraction, kind, seed=3, contaminant_images=contaminant)
    assert isinstance(data, ContaminatedDataset) and len(data) == n
    assert data.num_contaminated == round(fraction * n) == int(data.is_contaminated.sum())
    assert data.is_contaminated.dtype == torch.bool and data.risk.dtype == torch.float32
    torch.testing.assert_close(images, original, rtol=0, atol=0)  # the input is not modified
    clean = ~data.is_contaminated
    torch.testing.assert_close(data.images[clean], images[clean], rtol=0, atol=0)
    bad = data.contaminated_indices
    assert all(not torch.equal(data.images[i], images[i]) for i in bad)


@pytest.mark.parametrize("kind", CONTAMINATION_KINDS)
def test_contaminate_is_deterministic_per_seed(kind):
    images = _clean_images(60)
    contaminant = torch.rand(100, 1, 8, 8) * 2 - 1
    first = contaminate(images, 0.3, kind, seed=7, contaminant_images=contaminant)
    second = contaminate(images, 0.3, kind, seed=7, contaminant_images=contaminant)
    other = contaminate(images, 0.3, kind, seed=8, contaminant_images=contaminant)
    assert torch.equal(first.images, second.images) and torch.equal(first.is_contaminated, second.is_contaminated)
    assert not torch.equal(first.is_contaminated, other.is_contaminated)


def test_contaminate_gaussian_kind_carries_exact_risk():
    images = _clean_images(200, size=16)
    data = contaminate(images, 0.4, "gaussian", seed=0, noise_std=0.75)
    bad = data.is_contaminated
    assert (data.risk[bad] == 0.75).all() and (data.risk[~bad] == 0).all()
    residual = data.images[bad] - images[bad]
    assert abs(residual.mean().item()) < 0.02
    assert abs(residual.std().item() - 0.75) < 0.02
    assert data.images.abs().max() > 1.5  # not clipped: x + r * n holds exactly


@pytest.mark.parametrize("distribution, std", [("uniform", 1 / 3 ** 0.5), ("gaussian", 0.5)])
def test_contaminate_noise_kind_fills_data_range(distribution, std):
    images = _clean_images(100, size=16)
    data = contaminate(images, 0.5, "noise", seed=1, noise_distribution=distribution)
    noise = data.images[data.is_contaminated]
    assert noise.min() >= -1 and noise.max() <= 1
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - std) < 0.03  # clamping shrinks the Gaussian's std by about 2%
    assert (data.risk == 0).all()


def test_contaminate_dataset_kind_draws_distinct_contaminants():
    images = _clean_images(50)
    contaminant = torch.arange(30, dtype=torch.float32).reshape(30, 1, 1, 1).expand(30, 1, 8, 8) / 30
    data = contaminate(images, 0.4, "dataset", seed=2, contaminant_images=contaminant)
    drawn = data.images[data.is_contaminated][:, 0, 0, 0] * 30
    assert torch.equal(drawn, drawn.round())
    assert drawn.unique().numel() == 20  # without replacement while the contaminant set is large enough
    few = contaminate(images, 0.4, "dataset", seed=2, contaminant_images=contaminant[:3])
    assert few.num_contaminated == 20
    assert set((few.images[few.is_contaminated][:, 0, 0, 0] * 30).round().tolist()) <= {0.0, 1.0, 2.0}


def test_contaminated_dataset_items_and_loader():
    data = contaminate(_clean_images(10), 0.3, "gaussian", seed=0)
    image, is_contaminated, risk, index = data[4]
    assert image.shape == (1, 8, 8) and index == 4
    assert is_contaminated.dtype == torch.bool and risk.dtype == torch.float32
    images, flags, risks, indices = next(iter(torch.utils.data.DataLoader(data, batch_size=10)))
    assert images.shape == (10, 1, 8, 8) and torch.equal(flags, data.is_contaminated)
    assert torch.equal(risks, data.risk) and indices.tolist() == list(range(10))
    assert "contaminated=3" in repr(data)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan"), "0.3", True])
def test_contaminate_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\)"):
        contaminate(_clean_images(), fraction, "noise")


def test_contaminate_error_messages():
    images = _clean_images()
    with pytest.raises(ValueError, match="unknown contamination kind 'blur'; expected one of noise, gaussian, dataset"):
        contaminate(images, 0.1, "blur")
    with pytest.raises(ValueError, match="kind='dataset' needs contaminant_images"):
        contaminate(images, 0.1, "dataset")
    with pytest.raises(ValueError, match=r"contaminant_images must hold .* shape \(1, 8, 8\)"):
        contaminate(images, 0.1, "dataset", contaminant_images=torch.zeros(5, 3, 8, 8))
    with pytest.raises(ValueError, match="noise_std must be a positive finite number"):
        contaminate(images, 0.1, "gaussian", noise_std=0.0)
    with pytest.raises(ValueError, match="noise_distribution must be one of uniform, gaussian"):
        contaminate(images, 0.1, "noise", noise_distribution="laplace")
    with pytest.raises(TypeError, match="images must be a floating tensor"):
        contaminate(torch.zeros(4, 8, dtype=torch.uint8), 0.1, "noise")


@needs_fashion_mnist
def test_a_rare_class_control_keeps_the_order_and_caps_one_class():
    from robust_diffusion.training.experiment import load_experiment_data
    full = load_experiment_data("fashion-mnist", 0.0, num_train=400)
    rare = load_experiment_data("fashion-mnist", 0.0, num_train=400, rare_class=1, rare_fraction=0.03)
    labels = rare.train_labels
    assert labels.numel() == 400 and int((labels == 1).sum()) == 12 and "class 1 rare (12 images, 3%)" in rare.description
    # the same images as before up to the 12th trouser, then the next non-trouser images fill the set
    first = full.train_labels
    cut = int(torch.nonzero(first == 1).flatten()[11]) + 1
    assert torch.equal(labels[:cut], first[:cut]) and not bool((labels[cut:] == 1).any())
    assert torch.equal(rare.test_labels, full.test_labels)  # the test split is not thinned
    contaminated = load_experiment_data("fashion-mnist", 0.3, num_train=400, rare_class=1, rare_fraction=0.03, seed=0)
    assert torch.equal(contaminated.train_labels, labels)  # contamination comes after, on the same images
    with pytest.raises(ValueError, match=r"rare_class must be one of the dataset's classes \[0, 1, 2"):
        load_experiment_data("fashion-mnist", 0.0, num_train=400, rare_class=12)
    with pytest.raises(ValueError, match="rare_fraction must be a fraction in"):
        load_experiment_data("fashion-mnist", 0.0, num_train=400, rare_class=1, rare_fraction=1.5)
