"""Contaminant detectors a skeptic can check (docs/DESIGN.md, Evidence).

:func:`~robust_diffusion.training.metrics.train_contaminant_detector` learns clean images against pure
contaminants. Two things could flatter a robust loss's contaminant fraction: a detector that learned from the
diffusion models' own training images, and generated samples that are half garment, half junk (noise inside a
garment's outline, a noisy corner), which a detector that only saw clean images and pure junk may call clean.
This module measures and closes the second gap; the example (``examples/cifar10_contaminated.py``) closes the
first by drawing the detectors' images from the end of the training split
(:func:`~robust_diffusion.training.experiment.load_experiment_data` with ``from_end=True``; :func:`count_shared`
checks it).

- Hybrids: :func:`make_hybrids` replaces the part of clean images that :func:`silhouette_mask` (the pixels that
  differ from the background) or :func:`region_mask` (a random half or quarter) selects by the contaminant;
  :func:`make_hybrid_set` mixes styles; :func:`hybrid_styles` says which styles make sense for a dataset and kind.
- :func:`train_detectors`: from a half-contaminated set of images, the pure-contaminant detector and a
  hybrid-aware one (the same network, with hybrids of the clean images among the contaminants), each with its
  accuracy on a held-out fifth and its recall (fraction called contaminant) on hybrids of the held-out clean images.
- :func:`contaminant_probability` per sample and :func:`write_calls`: every sample's probability and call under
  each detector, as CSV.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import metrics
from .data import ContaminatedDataset

__all__ = ["DETECTOR_CACHE_FILES", "HYBRID_STYLES", "Detectors", "contaminant_probability", "count_shared",
           "hybrid_recall", "hybrid_styles", "make_hybrid_set", "make_hybrids", "region_mask", "silhouette_mask",
           "train_detectors", "write_calls"]

PathLike = Union[str, os.PathLike]

#: ``silhouette``: the contaminant inside the image's foreground (for noise: noise in a garment's outline, the
#: background kept); ``partial``: the contaminant over a random half or quarter of the image.
HYBRID_STYLES = ("silhouette", "partial")
#: The cache files of :func:`train_detectors`' two networks, per contamination kind. Named apart from the
#: detector that learned from the diffusion models' own images (``detector_<kind>.safetensors``), so that an old
#: cache is never taken for them.
DETECTOR_CACHE_FILES = {"pure": "detector_{kind}_heldout.safetensors",
                        "hybrid": "detector_{kind}_hybrid.safetensors"}
#: How far from the background value a pixel must be to count as foreground: 0.05 in [-1, 1] is about 6 of 255
#: grey levels, above Fashion-MNIST's background, below the faint edges of its garments.
DEFAULT_TOLERANCE = 0.05

# The regions a partial hybrid replaces, as fractions (top, bottom, left, right): the four halves, the four quarters.
_REGIONS = ((0, 0.5, 0, 1), (0.5, 1, 0, 1), (0, 1, 0, 0.5), (0, 1, 0.5, 1),
            (0, 0.5, 0, 0.5), (0, 0.5, 0.5, 1), (0.5, 1, 0, 0.5), (0.5, 1, 0.5, 1))


# ---------------------------------------------------------------------------------------------- hybrids
def silhouette_mask(images: Tensor, background: float = -1.0, tolerance: float = DEFAULT_TOLERANCE) -> Tensor:
    """``[N, 1, H, W]`` bool: the pixels of ``images`` (``[N, C, H, W]``) where some channel differs from
    ``background`` by more than ``tolerance`` (a garment on Fashion-MNIST's black background)."""
    _check_images(images)
    return ((images.detach().float() - background).abs() > tolerance).any(dim=1, keepdim=True)


def region_mask(count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """``[count, 1, height, width]`` bool: for each image a random half (top, bottom, left or right) or quarter,
    each of the eight regions equally likely, drawn from ``generator``."""
    choice = torch.randint(0, len(_REGIONS), (count,), generator=generator)
    bounds = torch.tensor(_REGIONS)[choice]  # [count, 4]
    rows = (torch.arange(height) + 0.5) / height  # pixel centres as fractions
    cols = (torch.arange(width) + 0.5) / width
    in_rows = (rows >= bounds[:, 0:1]) & (rows < bounds[:, 1:2])  # [count, H]
    in_cols = (cols >= bounds[:, 2:3]) & (cols < bounds[:, 3:4])  # [count, W]
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def make_hybrids(images: Tensor, style: str, generator: torch.Generator, *, kind: str = "noise",
                 contaminants: Optional[Tensor] = None, noise_std: float = 0.5, background: float = -1.0,
                 tolerance: float = DEFAULT_TOLERANCE) -> Tensor:
    """Hybrids of clean ``images`` (``[N, C, H, W]`` in [-1, 1]) and a contaminant, float32 on the CPU.

    ``style`` picks the pixels replaced: ``"silhouette"`` those :func:`silhouette_mask` finds (the background is
    kept), ``"partial"`` a random half or quarter (:func:`region_mask`). ``kind`` is what they become, as in
    :func:`~robust_diffusion.training.data.contaminate`: ``"noise"`` uniform noise in [-1, 1], ``"gaussian"`` the
    image plus N(0, noise_std^2) noise, ``"dataset"`` the same pixels of an image drawn from ``contaminants``
    (partial only: a silhouette of one object filled with another is no such image). Every random draw comes from
    ``generator``, so the same generator state gives the same hybrids.
    """
    _check_images(images)
    if style not in HYBRID_STYLES:
        raise ValueError(f"unknown hybrid style {style!r}; expected one of {', '.join(HYBRID_STYLES)}")
    if kind not in ("noise", "gaussian", "dataset"):
        raise ValueError(f"unknown contamination kind {kind!r}; expected noise, gaussian or dataset")
    if kind == "dataset":
        if style == "silhouette":
            raise ValueError("silhouette hybrids need a noise contaminant (kind noise or gaussian); "
                             "for kind 'dataset' use 'partial'")
        if contaminants is None or contaminants.shape[0] == 0 or contaminants.shape[1:] != images.shape[1:]:
            raise ValueError(f"kind 'dataset' needs contaminants, at least one image of shape "
                             f"{tuple(images.shape[1:])}")
    clean = images.detach().cpu().float()
    n, _, height, width = clean.shape
    if style == "silhouette":
        mask = silhouette_mask(clean, background, tolerance)
    else:
        mask = region_mask(n, height, width, generator)
    if kind == "noise":
        replacement = torch.rand(clean.shape, generator=generator) * 2.0 - 1.0
    elif kind == "gaussian":
        replacement = clean + noise_std * torch.randn(clean.shape, generator=generator)
    else:
        source = torch.randint(0, contaminants.shape[0], (n,), generator=generator)
        replacement = contaminants.detach().cpu().float()[source]
    return torch.where(mask, replacement, clean)


def make_hybrid_set(images: Tensor, styles: Sequence[str], generator: torch.Generator,
                    **options) -> Tuple[Tensor, Tensor]:
    """One hybrid of each of ``images``, the ``styles`` shared out evenly in a random order: returns the hybrids
    and each one's style as an index into ``styles`` (int64). ``options`` go to :func:`make_hybrids`."""
    _check_images(images)
    if not styles:
        raise ValueError("styles is empty")
    style_index = torch.randperm(images.shape[0], generator=generator) % len(styles)
    hybrids = images.detach().cpu().float().clone()
    for s, style in enumerate(styles):
        chosen = style_index == s
        if chosen.any():
            hybrids[chosen] = make_hybrids(hybrids[chosen], style, generator, **options)
    return hybrids, style_index


def hybrid_styles(dataset: str, kind: str) -> Tuple[str, ...]:
    """The hybrid styles that make sense for a dataset and contamination kind: silhouettes need a plain
    background (Fashion-MNIST's) and a noise contaminant (``noise``, ``gaussian``); partial hybrids always work
    (for ``dataset``: half or a quarter of an image of the other distribution)."""
    if dataset == "fashion-mnist" and kind in ("noise", "gaussian"):
        return HYBRID_STYLES
    return ("partial",)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor [N, C, H, W], got "
                         + (f"shape {tuple(images.shape)}, dtype {images.dtype}" if isinstance(images, Tensor)
                            else type(images).__name__))


# ---------------------------------------------------------------------------------------------- detectors
def contaminant_probability(detector: metrics.FeatureClassifier, samples: Tensor, batch_size: int = 512) -> Tensor:
    """Each sample's probability of being a contaminant under a 2-class detector, ``[N]`` float32 on the CPU
    (:func:`~robust_diffusion.training.metrics.contaminant_fraction` is the share above 0.5)."""
    if detector.num_classes != 2:
        raise ValueError(f"detector must be a 2-class (clean, contaminant) classifier, got {detector.num_classes} "
                         f"classes; build it with train_contaminant_detector")
    return metrics._batched(detector, samples, batch_size, lambda x: detector(x).softmax(1)[:, 1])


def hybrid_recall(detector: metrics.FeatureClassifier, hybrids: Tensor, style_index: Tensor,
                  styles: Sequence[str], threshold: float = 0.5) -> Dict[str, float]:
    """The fraction of ``hybrids`` the detector calls contaminant, per style and over ``"all"`` (NaN where a
    style has no hybrid)."""
    called = (contaminant_probability(detector, hybrids) > threshold if hybrids.shape[0]
              else torch.zeros(0, dtype=torch.bool))
    recall = {style: called[style_index == s].float().mean().item() if (style_index == s).any() else math.nan
              for s, style in enumerate(styles)}
    recall["all"] = called.float().mean().item() if called.numel() else math.nan
    return recall


class Detectors(NamedTuple):
    """What :func:`train_detectors` trained and measured.

    Attributes:
        pure: the detector of clean images against pure contaminants, with its held-out accuracy.
        hybrid: the same network trained with hybrids of the clean images among the contaminants.
        styles: the hybrid styles used.
        recall: ``{"pure": {...}, "hybrid": {...}}``: each detector's recall on hybrids of the held-out clean
            images, per style and ``"all"``.
        num_train, num_test: the images each detector learned from (before hybrids) and the held-out ones.
        num_hybrids: held-out hybrids the recall is measured on.
    """

    pure: metrics.TrainedClassifier
    hybrid: metrics.TrainedClassifier
    styles: Tuple[str, ...]
    recall: Dict[str, Dict[str, float]]
    num_train: int
    num_test: int
    num_hybrids: int


def train_detectors(data: ContaminatedDataset, styles: Sequence[str] = HYBRID_STYLES, *, seed: int = 0,
                    epochs: int = 3, background: float = -1.0, cache_dir: Optional[PathLike] = None,
                    device=None, progress: bool = True) -> Detectors:
    """Train the pure-contaminant and the hybrid-aware detector on ``data`` (a contaminated set, e.g. half
    contaminated) and measure both.

    The last fifth of ``data`` is held out. On the rest, the pure detector learns clean (0) against contaminated
    (1) images, as :func:`~robust_diffusion.training.metrics.train_contaminant_detector` always did; the
    hybrid-aware one learns the same images plus one hybrid of every clean image as a contaminant (so each garment
    appears both clean and hybrid: the texture decides, not the garment). Both report their accuracy on the
    held-out fifth as it is (clean against pure contaminants) and their recall on hybrids of its clean images,
    drawn with another seed than the training hybrids. For ``kind="gaussian"`` the hybrids' noise std is the
    contaminants' known risk; for ``kind="dataset"`` the other-distribution pixels come from the contaminants of
    the same part (training or held out). ``cache_dir``: where both networks are cached
    (:data:`DETECTOR_CACHE_FILES`; see :func:`~robust_diffusion.training.metrics.train_classifier`).
    """
    styles = tuple(styles)
    images, flags = data.images.detach().cpu(), data.is_contaminated.detach().cpu().bool()
    n = images.shape[0]
    split = n - n // 5  # the last fifth measures the detectors
    if n // 5 == 0:
        raise ValueError(f"train_detectors needs at least 5 images to hold out a fifth, got {n}")
    train_x, train_y, test_x, test_y = images[:split], flags[:split], images[split:], flags[split:]
    options: Dict[str, object] = dict(kind=data.kind, background=background)
    if data.kind == "gaussian" and flags.any():
        options["noise_std"] = float(data.risk.detach().cpu()[flags].max())

    def part_options(x: Tensor, y: Tensor) -> Dict[str, object]:
        return {**options, "contaminants": x[y]} if data.kind == "dataset" else options

    def cache(which: str) -> Optional[Path]:
        return None if cache_dir is None else Path(cache_dir) / DETECTOR_CACHE_FILES[which].format(kind=data.kind)

    common = dict(test_images=test_x, test_labels=test_y, epochs=epochs, seed=seed, device=device,
                  progress=progress)
    pure = metrics.train_contaminant_detector(train_x, train_y, cache_path=cache("pure"), **common)
    train_hybrids, _ = make_hybrid_set(train_x[~train_y], styles, torch.Generator().manual_seed(seed),
                                       **part_options(train_x, train_y))
    hybrid = metrics.train_contaminant_detector(
        torch.cat([train_x, train_hybrids.to(train_x.dtype)]),
        torch.cat([train_y, torch.ones(train_hybrids.shape[0], dtype=torch.bool)]),
        cache_path=cache("hybrid"), **common)
    test_hybrids, test_styles = make_hybrid_set(test_x[~test_y], styles, torch.Generator().manual_seed(seed + 1),
                                                **part_options(test_x, test_y))
    recall = {name: hybrid_recall(trained.model, test_hybrids, test_styles, styles)
              for name, trained in (("pure", pure), ("hybrid", hybrid))}
    return Detectors(pure, hybrid, styles, recall, split, n - split, test_hybrids.shape[0])


# ---------------------------------------------------------------------------------------------- bookkeeping
def count_shared(indices: Tensor, *first_counts: Optional[int]) -> int:
    """How many of ``indices`` (positions in a training split) fall among the first ``n`` images of it for some
    ``n`` in ``first_counts`` (``None``: the whole split), i.e. are also images of a model trained on those."""
    indices = torch.as_tensor(indices)
    if any(count is None for count in first_counts):
        return int(indices.numel())
    limit = max(first_counts, default=0)
    return int((indices < limit).sum())


def write_calls(path: PathLike, probabilities: Dict[str, Tensor], threshold: float = 0.5) -> Path:
    """Write every sample's probability and call under each detector as CSV: a column ``sample`` (its index),
    then ``p_<name>`` for each entry of ``probabilities`` (name -> ``[N]``), then ``call_<name>`` (1 when the
    probability exceeds ``threshold``, the rule of
    :func:`~robust_diffusion.training.metrics.contaminant_fraction`)."""
    names = list(probabilities)
    columns = [probabilities[name].detach().cpu().flatten() for name in names]
    if not columns or len({c.numel() for c in columns}) != 1:
        raise ValueError("probabilities must hold at least one detector, every one with the same number of samples")
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample"] + [f"p_{name}" for name in names] + [f"call_{name}" for name in names])
        for i in range(columns[0].numel()):
            p = [float(c[i]) for c in columns]
            writer.writerow([i] + [f"{value:.6f}" for value in p] + [int(value > threshold) for value in p])
    return path
