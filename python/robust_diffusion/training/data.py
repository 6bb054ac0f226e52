"""Datasets and Huber epsilon-contamination for the robustness experiments (docs/DESIGN.md, Evidence), and your own
images for the data audit and the training command.

Every loader returns images as float32 in ``[-1, 1]`` with shape ``[N, C, H, W]`` (plus int64 class labels for the
benchmark datasets), the range and layout the diffusion models and samplers in this package expect.

- Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package (IDX gz files; works offline), found at
  :data:`FASHION_MNIST_ROOT` or, where the package put them elsewhere, through ``dpkg -L dataset-fashion-mnist``.
- CIFAR-10 is read through torchvision from a local copy (``download=True`` fetches it where there is network).
- :func:`contaminate` replaces an exact, seeded fraction of the images by outliers and returns a
  :class:`ContaminatedDataset` that remembers which samples were replaced and their known noise level (risk).
- :func:`load_images` reads your own data, a folder of image files (:func:`load_image_folder`, needs Pillow) or an
  array file (:func:`load_array_file`: ``.npy``, ``.npz`` or IDX), into an :class:`ImageSet` that also lists the
  files it could not read and says what it did (value range, resizing, channels) for a report.
"""

from __future__ import annotations

import gzip
import math
import os
import subprocess
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CONTAMINATION_KINDS",
    "DEFAULT_IMAGE_SIZE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGE_SUFFIXES",
    "ContaminatedDataset",
    "ImageSet",
    "LabelledImages",
    "contaminate",
    "fashion_mnist_root",
    "load_array_file",
    "load_cifar10",
    "load_fashion_mnist",
    "load_image_folder",
    "load_images",
    "read_idx",
    "resize_center_crop",
    "to_unit_range",
    "unreadable_summary",
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
    ``images [N, ...]``, ``is_contaminated [N]`` (bool), ``risk [N]`` (float32), ``kind``, ``fraction``, and
    ``labels [N]`` (int64 class labels of the images before contamination; ``None`` for unlabelled data), which a
    class-conditional :class:`~robust_diffusion.training.trainer.Trainer` reads by index, as it reads
    ``is_contaminated``: the items keep their four fields.
    """

    def __init__(self, images: Tensor, is_contaminated: Tensor, risk: Tensor, kind: str, fraction: float,
                 labels: Optional[Tensor] = None):
        if not (images.shape[0] == is_contaminated.shape[0] == risk.shape[0]):
            raise ValueError(f"images, is_contaminated and risk need the same length, got {images.shape[0]}, "
                             f"{is_contaminated.shape[0]} and {risk.shape[0]}")
        self.labels = _check_labels(labels, images.shape[0])
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
                contaminant_images: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ContaminatedDataset:
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
        labels: the images' class labels ``[N]`` (int), kept as the dataset's ``labels`` (a replaced image keeps its
            label: the outlier took its place in that class).
    """
    _check_contamination(images, fraction, kind, noise_distribution, noise_std, contaminant_images)
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
    return ContaminatedDataset(out, is_contaminated.to(out.device), risk.to(out.device), kind, float(fraction),
                               labels=labels)


def _check_labels(labels, count: int) -> Optional[Tensor]:
    """Class labels as an int64 tensor ``[count]`` of non-negative values, or ``None``."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.shape != (count,):
        raise ValueError(f"labels must be integer class labels, one per image [{count}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got {int(labels.min())}")
    return labels.to(torch.int64)


def _check_contamination(images: Tensor, fraction: float, kind: str, noise_distribution: str, noise_std: float,
                         contaminant_images: Optional[Tensor]) -> None:
    """:func:`contaminate`'s arguments, each refused with a message that names it."""
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


# ---------------------------------------------------------------------------------------------- your own images
#: The files :func:`load_image_folder` reads (any other file in the folder is counted and reported as ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The side of the square images a folder is resized and cropped to unless told otherwise: small enough to train
#: on a CPU in minutes, and the size of CIFAR-10 and of padded Fashion-MNIST.
DEFAULT_IMAGE_SIZE = 32
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageSet(NamedTuple):
    """Images read from a folder or an array file.

    Attributes:
        images: float32 ``[N, C, H, W]`` in ``[-1, 1]``.
        paths: for a folder, the file of each image (``images[i]`` came from ``paths[i]``); empty for an array.
        unreadable: ``(file, reason)`` of every image file that could not be read (left out of ``images``).
        notes: what the loader found and did (value range, resizing, channels, ignored files), one sentence each.
        labels: int64 class labels ``[N]`` where the data has them (a folder of class sub-folders, an ``.npz`` with
            a ``labels`` array), else ``None``.
        classes: the class names, ``labels`` indexing them (the sub-folders' names, sorted; for an ``.npz`` the
            label values as strings, 0 to the largest).
    """

    images: Tensor
    paths: List[str]
    unreadable: List[Tuple[str, str]]
    notes: List[str]
    labels: Optional[Tensor] = None
    classes: Tuple[str, ...] = ()


def load_images(source: PathLike, image_size: Optional[int] = None, channels: Optional[int] = None) -> ImageSet:
    """Your data, whatever its form: a folder of image files (:func:`load_image_folder`, resized and cropped to
    ``image_size``, default :data:`DEFAULT_IMAGE_SIZE`) or an array file (:func:`load_array_file`: ``.npy``,
    ``.npz`` or IDX, kept at its size unless ``image_size`` is given). ``channels``: 1 (grey) or 3 (RGB); default:
    what the data has (for a folder, 1 when every image is greyscale, else 3)."""
    path = Path(source)
    if path.is_dir():
        return load_image_folder(path, DEFAULT_IMAGE_SIZE if image_size is None else image_size, channels)
    if path.is_file():
        return load_array_file(path, image_size, channels)
    raise FileNotFoundError(f"{source} does not exist (expected a folder of images, a .npy/.npz array or an IDX file)")


def load_image_folder(root: PathLike, image_size: int = DEFAULT_IMAGE_SIZE,
                      channels: Optional[int] = None) -> ImageSet:
    """Read every image file under ``root`` (recursively, in sorted path order; :data:`IMAGE_SUFFIXES`) with Pillow.

    Each image is turned upright by its EXIF orientation, its shorter side resized to ``image_size`` (bilinear,
    antialiased) and its centre cropped to ``image_size`` x ``image_size``, so images of any and of mixed sizes
    work. An alpha channel is dropped; 16-bit greyscale is scaled from 0..65535. ``channels`` 1 or 3 (default: 1
    when every image is greyscale, else 3; colour images are made grey with Pillow's luma weights, grey ones
    repeated over RGB). A file that cannot be read is listed in ``unreadable``, never skipped silently; a folder
    with no image file, or with none readable, raises a ValueError naming it.

    Classes: a folder holding only sub-folders (torchvision's ``ImageFolder`` layout, ``root/<class>/.../<image>``)
    gives each image the index of its sub-folder among the sorted sub-folder names (``labels``, ``classes``), as
    ``ImageFolder`` does; a folder with image files of its own has no labels.
    """
    root = Path(root)
    _check_size_and_channels(image_size, channels)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError("reading a folder of images needs Pillow: pip install pillow") from None
    files = sorted(p for p in root.rglob("*") if p.is_file())
    image_files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = len(files) - len(image_files)
    if not image_files:
        raise ValueError(f"no images found in {root}: it holds no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} "
                         f"files (searched recursively; {ignored} other file(s))")
    pixels, paths, unreadable, sizes = [], [], [], []
    grey_count = alpha_count = 0
    for path in image_files:
        try:
            array, size, grey, alpha = _read_image_file(path, image_size, Image, ImageOps)
        except Exception as error:  # Pillow raises many types for a bad file; each is reported, none is fatal
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            unreadable.append((str(path), f"{type(error).__name__}: {reason}".rstrip(": ")))
            continue
        sizes.append(size)
        grey_count += grey
        alpha_count += alpha
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        pixels.append(resize_center_crop(tensor.unsqueeze(0), image_size)[0])
        paths.append(str(path))
    if not pixels:
        first, reason = unreadable[0]
        raise ValueError(f"none of the {len(image_files)} image files in {root} could be read (first: {first}: "
                         f"{reason})")
    channels = channels or (1 if grey_count == len(pixels) else 3)
    images = torch.stack([_to_channels(p, channels) for p in pixels]) * 2.0 - 1.0
    classes = _class_folders(root)
    labels = None
    if classes:
        index = {name: k for k, name in enumerate(classes)}
        labels = torch.tensor([index[Path(path).relative_to(root).parts[0]] for path in paths], dtype=torch.int64)
    notes = [f"{len(image_files)} image files under {root} (searched recursively), {len(pixels)} read"
             + (f", {len(unreadable)} unreadable" if unreadable else "")]
    if ignored:
        notes.append(f"{ignored} other file(s) ignored (not {', '.join(IMAGE_SUFFIXES)})")
    notes += _folder_notes(sizes, image_size, grey_count, len(pixels) - grey_count, channels, alpha_count)
    if classes:
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        notes.append(f"{len(classes)} classes from the sub-folders (sorted, as torchvision's ImageFolder): "
                     + ", ".join(f"{k} {name!r} ({n})" for k, (name, n) in enumerate(zip(classes, counts))))
    return ImageSet(images.contiguous(), paths, unreadable, notes, labels, classes)


def _class_folders(root: Path) -> Tuple[str, ...]:
    """The sorted sub-folder names of a folder in ``ImageFolder``'s layout (sub-folders and no image file of its
    own), else ``()``."""
    entries = list(root.iterdir())
    if any(entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES for entry in entries):
        return ()
    return tuple(sorted(entry.name for entry in entries if entry.is_dir()))


def _read_image_file(path: Path, image_size: int, Image, ImageOps) -> Tuple[np.ndarray, Tuple[int, int], bool, bool]:
    """One image file as float32 pixels in [0, 1] (H x W, or H x W x 3), upright by its EXIF orientation; with its
    stored size (width, height), whether it is greyscale and whether it had transparency."""
    with Image.open(path) as opened:
        size = opened.size
        if opened.format == "JPEG":
            opened.draft(opened.mode, (image_size, image_size))  # decode big JPEGs at a reduced scale
        image = ImageOps.exif_transpose(opened)
        image.load()
        grey = image.mode in _GREY_MODES
        alpha = image.mode in ("LA", "RGBA", "PA") or "transparency" in image.info
        if image.mode in _SIXTEEN_BIT_MODES:
            array = np.asarray(image, dtype=np.float32) / 65535.0
        elif image.mode == "F":
            array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        else:
            array = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
    return array, size, grey, alpha


def _folder_notes(sizes: List[Tuple[int, int]], image_size: int, grey_count: int, colour_count: int, channels: int,
                  alpha_count: int) -> List[str]:
    """What the folder loader did to the images' sizes, colours and transparency, in sentences for the report."""
    notes = []
    distinct = sorted(set(sizes), key=lambda wh: (wh[0] * wh[1], wh))
    side = f"{image_size}x{image_size}"
    if len(distinct) > 1:
        notes.append(f"mixed sizes: {len(distinct)} different sizes from {distinct[0][0]}x{distinct[0][1]} to "
                     f"{distinct[-1][0]}x{distinct[-1][1]} (width x height); each image was resized (shorter side "
                     f"to {image_size}) and centre-cropped to {side}")
    elif distinct[0] != (image_size, image_size):
        notes.append(f"all images are {distinct[0][0]}x{distinct[0][1]}: resized (shorter side to {image_size}) "
                     f"and centre-cropped to {side}")
    else:
        notes.append(f"all images are {side}: used as they are")
    notes.append(f"{grey_count} greyscale and {colour_count} colour image(s): used as "
                 + ("grey (1 channel)" if channels == 1 else "RGB (3 channels)")
                 + (", colour images converted to grey" if channels == 1 and colour_count else "")
                 + (", greyscale images repeated over RGB" if channels == 3 and grey_count else ""))
    if alpha_count:
        notes.append(f"{alpha_count} image(s) have transparency: the alpha channel was dropped")
    return notes


def load_array_file(path: PathLike, image_size: Optional[int] = None, channels: Optional[int] = None) -> ImageSet:
    """Read images from a ``.npy`` or ``.npz`` array (an ``.npz`` with one array, or with one called ``images``) or
    an IDX file (any other name, ``.gz`` compressed or not; :func:`read_idx`). An ``.npz`` may also hold ``labels``,
    one non-negative integer class label per image (``ImageSet.labels``). Nothing is unpickled.

    Layouts ``[N, H, W]`` (grey), ``[N, H, W, C]`` or ``[N, C, H, W]`` with C = 1 or 3 (told apart by where the 1
    or 3 is; ``[N, H, W, C]`` when both fit). Values: integers 0..255 (uint8), or floats in ``[0, 1]``, in
    ``[-1, 1]`` (when some are negative) or in ``[0, 255]``; the range found is said in ``notes``, and anything
    else, or a non-finite value, raises a ValueError. The images keep their size unless ``image_size`` is given
    (shorter side resized, centre cropped); ``channels`` 1 or 3 converts (default: the array's).
    """
    path = Path(path)
    _check_size_and_channels(image_size, channels)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    suffix = path.suffix.lower()
    labels = None
    try:
        if suffix == ".npy":
            array, what = np.load(path, allow_pickle=False), ".npy array"
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = [name for name in archive.files if name != "labels"]
                if len(names) != 1 and "images" not in names:
                    raise ValueError(f"it holds the arrays {list(archive.files)}: keep one, or name the images "
                                     f"'images' (and class labels 'labels')")
                name = names[0] if len(names) == 1 else "images"
                array, what = archive[name], f".npz array {name!r}"
                labels = archive["labels"] if "labels" in archive.files else None
        else:
            array, what = read_idx(path).numpy(), "IDX file"
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read images from {path} ({reason}); expected a folder of images, a .npy/.npz "
                         f"array or an IDX file") from None
    unit, value_range = _unit_range(array, path)
    tensor, layout = _nchw(torch.from_numpy(unit), array.shape, path)
    notes = [f"{what} {path.name}: {tensor.shape[0]} images of {tensor.shape[2]}x{tensor.shape[3]} with "
             f"{tensor.shape[1]} channel(s) (layout {layout}), values {value_range}"]
    if channels is not None and channels != tensor.shape[1]:
        tensor = torch.stack([_to_channels(image, channels) for image in tensor])
        notes.append(f"converted to {'grey (1 channel)' if channels == 1 else 'RGB (3 channels)'}")
    if image_size is not None and tuple(tensor.shape[2:]) != (image_size, image_size):
        tensor = resize_center_crop(tensor, image_size)
        notes.append(f"resized (shorter side to {image_size}) and centre-cropped to {image_size}x{image_size}")
    classes: Tuple[str, ...] = ()
    if labels is not None:
        labels = _array_labels(labels, tensor.shape[0], path)
        classes = tuple(str(k) for k in range(int(labels.max()) + 1 if labels.numel() else 0))
        notes.append(f"labels: {len(classes)} classes (0..{len(classes) - 1}) from the .npz array 'labels'")
    return ImageSet((tensor * 2.0 - 1.0).contiguous(), [], [], notes, labels, classes)


def _array_labels(labels: np.ndarray, count: int, path: Path) -> Tensor:
    """An ``.npz``'s ``labels`` array: one non-negative integer per image (floats holding whole numbers count)."""
    whole = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and bool(np.all(np.isfinite(labels) & (np.round(labels) == labels))))
    if labels.shape != (count,) or not whole:
        raise ValueError(f"{path}: 'labels' must be one integer class label per image, shape ({count},), got "
                         f"{labels.dtype} {tuple(labels.shape)}" + ("" if labels.shape != (count,) else
                                                                    " with values that are not whole numbers"))
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{path}: 'labels' must be non-negative class indices, got {int(labels.min())}")
    return torch.from_numpy(labels.astype(np.int64))


def unreadable_summary(unreadable: List[Tuple[str, str]], first: int = 3) -> str:
    """One line for the files a folder loader could not read: how many, and the first few with their reasons."""
    shown = "; ".join(f"{path} ({reason})" for path, reason in unreadable[:first])
    more = f"; and {len(unreadable) - first} more" if len(unreadable) > first else ""
    return f"{len(unreadable)} unreadable image file(s) left out: {shown}{more}"


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Float images ``[N, C, H, W]``: the shorter side resized to ``size`` (bilinear, antialiased), then the centre
    cropped to ``size`` x ``size``. Images already of that size come back unchanged."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = torch.nn.functional.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                              antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top:top + size, left:left + size]


def _check_size_and_channels(image_size: Optional[int], channels: Optional[int]) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def _to_channels(image: Tensor, channels: int) -> Tensor:
    """One image ``[C, H, W]`` with C = 1 or 3 as ``channels`` channels (grey = Pillow's ITU-R 601 luma)."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)


def _unit_range(array: np.ndarray, path: Path) -> Tuple[np.ndarray, str]:
    """The array as float32 in [0, 1], and which range it was read as."""
    if array.size == 0:
        raise ValueError(f"{path} holds no images (shape {tuple(array.shape)})")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"{path}: integer values in [{low}, {high}]; expected 0..255 (8-bit pixels)")
        return array.astype(np.float32) / 255.0, f"0..255 ({array.dtype}, found {low}..{high})"
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: dtype {array.dtype} is not pixels; expected uint8 0..255 or floats in [0, 1] "
                         f"or [-1, 1]")
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ValueError(f"{path}: {bad} non-finite value(s) (NaN or inf) in the images")
    low, high = float(array.min()), float(array.max())
    found, tolerance = f"found {low:.3g}..{high:.3g}", 1e-3
    if low >= -tolerance and high <= 1 + tolerance:
        unit, said = array, f"floats read as [0, 1] ({found})"
    elif low >= -1 - tolerance and high <= 1 + tolerance:
        unit, said = (array + 1.0) / 2.0, f"floats read as [-1, 1] ({found})"
    elif low >= -tolerance and high <= 255 + tolerance:
        unit, said = array / 255.0, f"floats read as 0..255 ({found})"
    else:
        raise ValueError(f"{path}: values in [{low:.4g}, {high:.4g}]; expected uint8 0..255 or floats in [0, 1], "
                         f"[-1, 1] or [0, 255]")
    return np.clip(unit, 0.0, 1.0).astype(np.float32), said


def _nchw(tensor: Tensor, shape: Tuple[int, ...], path: Path) -> Tuple[Tensor, str]:
    if tensor.dim() == 3:
        return tensor.unsqueeze(1), "[N, H, W]"
    if tensor.dim() == 4 and shape[3] in (1, 3):
        return tensor.permute(0, 3, 1, 2), "[N, H, W, C]"
    if tensor.dim() == 4 and shape[1] in (1, 3):
        return tensor, "[N, C, H, W]"
    raise ValueError(f"{path}: shape {tuple(shape)} is not a stack of images; expected [N, H, W], [N, H, W, C] or "
                     f"[N, C, H, W] with 1 or 3 channels")
