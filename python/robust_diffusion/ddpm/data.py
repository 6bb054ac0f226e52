"""Datasets and Huber epsilon-contamination for the robustness experiments (docs/DESIGN.md, Evidence).

Every loader returns images as float32 in ``[-1, 1]`` with shape ``[N, C, H, W]`` plus int64 class labels,
the range and layout the diffusion models and samplers in this package expect.

- Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package (IDX gz files; works offline), found at
  :data:`FASHION_MNIST_ROOT` or, where the package put them elsewhere, through ``dpkg -L dataset-fashion-mnist``.
- CIFAR-10 is read through torchvision from a local copy (``download=True`` fetches it where there is network).
- :func:`contaminate` replaces an exact, seeded fraction of the images by outliers and returns a
  :class:`ContaminatedDataset` that remembers which samples were replaced and their known noise level (risk).
"""

from __future__ import annotations

import gzip
import math
import os
import subprocess
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CONTAMINATION_KINDS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "ContaminatedDataset",
    "LabelledImages",
    "contaminate",
    "fashion_mnist_root",
    "load_cifar10",
    "load_fashion_mnist",
    "read_idx",
    "to_unit_range",
]

PathLike = Union[str, os.PathLike]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts them
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

CONTAMINATION_KINDS = ("noise", "gaussian", "dataset")
_NOISE_DISTRIBUTIONS = ("uniform", "gaussian")


class LabelledImages(NamedTuple):
    """Images in ``[-1, 1]`` (float32, ``[N, C, H, W]``) and their int64 class labels ``[N]``."""

    images: Tensor
    labels: Tensor


# ---------------------------------------------------------------------------------------------- IDX / Fashion-MNIST
def read_idx(path: PathLike) -> Tensor:
    """Read an IDX file (optionally gzip-compressed) into a tensor of the shape its header declares.

    Fashion-MNIST images come back as uint8 ``[N, 28, 28]``, labels as uint8 ``[N]``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise ValueError(f"{path}: header declares shape {shape} ({expected} bytes of data), "
                         f"but the file holds {len(raw) - header_size} bytes")
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    # torch needs native byte order; astype copies, which also makes the buffer writable.
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def to_unit_range(images_uint8: Tensor) -> Tensor:
    """Map uint8 pixels 0..255 to float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1)."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def _fashion_mnist_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {root / (name + '.gz')}. Install Debian's package with "
        f"`apt-get install dataset-fashion-mnist` (it puts the IDX files in {FASHION_MNIST_ROOT}), "
        f"or pass root= pointing at a directory holding {name}.gz")


def fashion_mnist_root() -> Path:
    """The directory of the Fashion-MNIST IDX files: :data:`FASHION_MNIST_ROOT` when it holds them, else the
    directory that ``dpkg -L dataset-fashion-mnist`` lists for ``train-images-idx3-ubyte.gz`` (a package
    version that installs elsewhere), else :data:`FASHION_MNIST_ROOT` (whose missing files the loader reports)."""
    marker = "train-images-idx3-ubyte.gz"
    if (FASHION_MNIST_ROOT / marker).is_file():
        return FASHION_MNIST_ROOT
    try:
        listing = subprocess.run(["dpkg", "-L", FASHION_MNIST_PACKAGE], capture_output=True, text=True,
                                 timeout=30)
    except (OSError, subprocess.SubprocessError):  # no dpkg (not Debian), or it hung
        return FASHION_MNIST_ROOT
    if listing.returncode == 0:
        for line in listing.stdout.splitlines():
            path = Path(line.strip())
            if path.name == marker and path.is_file():
                return path.parent
    return FASHION_MNIST_ROOT


def load_fashion_mnist(split: str = "train", root: Optional[PathLike] = None,
                       pad_to: Optional[int] = 32) -> LabelledImages:
    """Load Fashion-MNIST as ``[N, 1, H, W]`` float32 images in ``[-1, 1]`` and int64 labels.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: directory with the IDX files; defaults to Debian's (:func:`fashion_mnist_root`).
        pad_to: pad the 28x28 images symmetrically with the background value -1 to this size.
            The default 32 lets a UNet halve the resolution three times without odd sizes
            (32 -> 16 -> 8 -> 4) and matches CIFAR-10; ``None`` keeps 28x28.
    """
    if split not in _FASHION_MNIST_PREFIX:
        raise ValueError(f"split must be one of {sorted(_FASHION_MNIST_PREFIX)}, got {split!r}")
    root = fashion_mnist_root() if root is None else Path(root)
    prefix = _FASHION_MNIST_PREFIX[split]
    images = read_idx(_fashion_mnist_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_fashion_mnist_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST files in {root} are inconsistent: images {tuple(images.shape)}, "
                         f"labels {tuple(labels.shape)}")
    images = to_unit_range(images).unsqueeze(1)
    if pad_to is not None:
        images = _pad_square(images, pad_to)
    return LabelledImages(images.contiguous(), labels.to(torch.int64))


def _pad_square(images: Tensor, size: int) -> Tensor:
    height, width = images.shape[-2:]
    if int(size) != size or size < max(height, width):
        raise ValueError(f"pad_to must be an integer >= {max(height, width)} (or None), got {size!r}")
    top, left = (size - height) // 2, (size - width) // 2
    padding = (left, size - width - left, top, size - height - top)
    return torch.nn.functional.pad(images, padding, value=-1.0)


# ---------------------------------------------------------------------------------------------- CIFAR-10
def load_cifar10(root: PathLike, split: str = "train", download: bool = False) -> LabelledImages:
    """Load CIFAR-10 through torchvision as ``[N, 3, 32, 32]`` float32 images in ``[-1, 1]`` and int64 labels.

    Args:
        root: the directory holding ``cifar-10-batches-py`` (torchvision's layout: the extracted
            python-version archive ``cifar-10-python.tar.gz``).
        split: ``"train"`` (50000 images) or ``"test"`` (10000 images).
        download: let torchvision fetch the archive into ``root`` if it is missing (needs network).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as error:
        raise ImportError("load_cifar10 needs torchvision: `pip install torchvision` (the release that "
                          "matches your torch)") from error
    folder = Path(root) / CIFAR10.base_folder
    if not download and not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder} does not exist. Extract cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {Path(root)}, or call "
            f"load_cifar10(root, download=True) on a machine with network access")
    try:
        dataset = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as error:
        raise RuntimeError(f"CIFAR-10 in {folder} is incomplete or corrupted ({error}); "
                           f"re-extract cifar-10-python.tar.gz there or pass download=True") from error
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)  # HWC -> CHW
    return LabelledImages(to_unit_range(images).contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- contamination
class ContaminatedDataset(Dataset):
    """A training set in which some images were replaced by outliers, with the ground truth kept.

    Item ``i`` is ``(image, is_contaminated, risk, index)``: the (possibly contaminated) float image,
    a bool scalar tensor, a float32 scalar tensor with the known per-sample noise std (the risk of
    docs/DESIGN.md, Risk; 0 for clean samples and for outliers whose corruption is not announced), and
    the int index, so a training loop can log per-sample influence weights against the truth.

    Build it with :func:`contaminate`. The attributes hold the whole set as tensors:
    ``images [N, ...]``, ``is_contaminated [N]`` (bool), ``risk [N]`` (float32), ``kind``, ``fraction``.
    """

    def __init__(self, images: Tensor, is_contaminated: Tensor, risk: Tensor, kind: str, fraction: float):
        if not (images.shape[0] == is_contaminated.shape[0] == risk.shape[0]):
            raise ValueError(f"images, is_contaminated and risk need the same length, got {images.shape[0]}, "
                             f"{is_contaminated.shape[0]} and {risk.shape[0]}")
        self.images = images
        self.is_contaminated = is_contaminated
        self.risk = risk
        self.kind = kind
        self.fraction = fraction

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, Tensor, int]:
        return self.images[index], self.is_contaminated[index], self.risk[index], int(index)

    @property
    def num_contaminated(self) -> int:
        return int(self.is_contaminated.sum())

    @property
    def contaminated_indices(self) -> Tensor:
        """Sorted int64 indices of the replaced samples."""
        return self.is_contaminated.nonzero().flatten()

    def __repr__(self) -> str:
        return (f"ContaminatedDataset(kind={self.kind!r}, n={len(self)}, contaminated={self.num_contaminated}, "
                f"image_shape={tuple(self.images.shape[1:])})")


def contaminate(images: Tensor, fraction: float, kind: str = "noise", seed: int = 0, *,
                noise_distribution: str = "uniform", noise_std: float = 0.5,
                contaminant_images: Optional[Tensor] = None) -> ContaminatedDataset:
    """Huber epsilon-contamination: replace exactly ``round(fraction * N)`` images by outliers.

    Which samples are replaced, and how, is drawn from ``torch.Generator().manual_seed(seed)``, so the
    same arguments always give the same dataset. ``images`` (float, ``[N, ...]`` in ``[-1, 1]``) is not modified.

    Kinds:
        ``"noise"``: i.i.d. pixel noise with no image in it. ``noise_distribution="uniform"`` draws
            U(-1, 1), filling the data range; ``"gaussian"`` draws N(0, 0.5^2) clamped to [-1, 1]
            (std 0.5 puts 95% of the mass inside the range). Risk 0: the learner is not told.
        ``"gaussian"``: the real image plus N(0, noise_std^2) noise, not clipped, so the sample is exactly
            ``x + noise_std * n`` and the risk-sensitive model of docs/DESIGN.md, Risk holds with
            ``risk = noise_std``. The default 0.5 (a quarter of the data range, PSNR about 12 dB) is
            heavy corruption that is still an image.
        ``"dataset"``: images drawn from ``contaminant_images`` (another distribution with the same
            per-image shape and range), without replacement when it has enough images. Risk 0.

    Args:
        fraction: the contaminated fraction p, in [0, 1).
        seed: seed of the generator that picks the samples and draws the outliers.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2:
        raise TypeError("images must be a floating tensor [N, ...] in [-1, 1] (e.g. from load_fashion_mnist), "
                        f"got {type(images).__name__}"
                        + (f" of dtype {images.dtype} and shape {tuple(images.shape)}"
                           if isinstance(images, Tensor) else ""))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if kind not in CONTAMINATION_KINDS:
        raise ValueError(f"unknown contamination kind {kind!r}; expected one of {', '.join(CONTAMINATION_KINDS)}")
    if kind == "noise" and noise_distribution not in _NOISE_DISTRIBUTIONS:
        raise ValueError(f"noise_distribution must be one of {', '.join(_NOISE_DISTRIBUTIONS)}, "
                         f"got {noise_distribution!r}")
    if kind == "gaussian" and not (isinstance(noise_std, (int, float)) and noise_std > 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a positive finite number, got {noise_std!r}")
    if kind == "dataset":
        if contaminant_images is None:
            raise ValueError("kind='dataset' needs contaminant_images, a tensor [M, ...] of outlier images")
        if tuple(contaminant_images.shape[1:]) != tuple(images.shape[1:]) or contaminant_images.shape[0] < 1:
            raise ValueError(f"contaminant_images must hold at least one image of shape {tuple(images.shape[1:])} "
                             f"(the clean images' shape), got {tuple(contaminant_images.shape)}; "
                             f"for grey contaminants of colour data use .expand(-1, 3, -1, -1)")

    n = images.shape[0]
    count = round(fraction * n)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=generator)[:count].sort().values
    out = images.detach().clone()
    is_contaminated = torch.zeros(n, dtype=torch.bool)
    is_contaminated[indices] = True
    risk = torch.zeros(n, dtype=torch.float32)
    if count:
        # Outliers are drawn on the CPU in float32 so the result does not depend on the images' device/dtype.
        shape = (count, *images.shape[1:])
        if kind == "noise":
            if noise_distribution == "uniform":
                outliers = torch.rand(shape, generator=generator) * 2.0 - 1.0
            else:
                outliers = (torch.randn(shape, generator=generator) * 0.5).clamp(-1.0, 1.0)
        elif kind == "gaussian":
            clean = images[indices.to(images.device)].detach().cpu().float()
            outliers = clean + noise_std * torch.randn(shape, generator=generator)
            risk[indices] = float(noise_std)
        else:
            m = contaminant_images.shape[0]
            source = (torch.randperm(m, generator=generator)[:count] if m >= count
                      else torch.randint(0, m, (count,), generator=generator))
            outliers = contaminant_images[source.to(contaminant_images.device)].detach().cpu().float()
        out[indices.to(out.device)] = outliers.to(device=out.device, dtype=out.dtype)
    return ContaminatedDataset(out, is_contaminated.to(out.device), risk.to(out.device), kind, float(fraction))
