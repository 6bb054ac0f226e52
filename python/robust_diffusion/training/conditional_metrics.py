"""How well a class-conditional model generates the class it is asked for, as the label-noise diffusion literature
reports it (TDSM, Na et al., arXiv 2402.17517): an evaluation classifier judges the samples generated for each
class.

- :func:`conditional_accuracy`: per class, the share of the samples requested as class k that the classifier
  assigns to k, and their mean over the requested classes. A model trained on flipped labels generates, for a
  class, some images of the classes whose images were given its label: its accuracy falls by about that share.
- :func:`class_frechet_distances`: per class, the Frechet distance between the samples requested as class k and the
  real images of class k, in an evaluation network's features (``metrics.extract_features``). With a few hundred
  samples a class the distances are biased upwards (fewer samples than features: singular covariances), so compare
  them only at equal sample counts.
- :func:`requested_labels`: the class-balanced labels to request.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .diversity import class_probabilities
from .metrics import frechet_distance

__all__ = ["ConditionalAccuracy", "class_frechet_distances", "conditional_accuracy", "requested_labels"]


class ConditionalAccuracy(NamedTuple):
    """``per_class`` float64 ``[K]``: the share of class k's samples the classifier assigns to k (NaN for a class
    not requested); ``mean``: their mean over the requested classes; ``counts`` int64 ``[K]``: samples requested per
    class."""

    per_class: Tensor
    mean: float
    counts: Tensor


def requested_labels(num_classes: int, per_class: int) -> Tensor:
    """``[num_classes * per_class]`` int64: every class ``per_class`` times, class by class."""
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"requested_labels needs at least one class and one sample a class, got "
                         f"num_classes={num_classes}, per_class={per_class}")
    return torch.arange(num_classes).repeat_interleave(per_class)


def _check_labels(labels: Tensor, count: int, num_classes: int, name: str) -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != count or labels.is_floating_point():
        raise ValueError(f"{name} must be [N] integer class labels, one per image ({count}), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    labels = labels.long().cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    return labels


def conditional_accuracy(classifier: nn.Module, samples: Tensor, requested: Tensor, num_classes: int,
                         batch_size: int = 512) -> ConditionalAccuracy:
    """The share of ``samples`` (images in ``[-1, 1]``) that ``classifier`` (logits ``[B, num_classes]``) assigns to
    the class each was requested as (``requested`` ``[N]``), per class and on average over the requested classes."""
    if samples.dim() != 4 or samples.shape[0] == 0:
        raise ValueError(f"conditional_accuracy: samples must be [N, C, H, W] with N > 0, got {tuple(samples.shape)}")
    requested = _check_labels(requested, samples.shape[0], num_classes, "requested")
    judged = class_probabilities(classifier, samples, num_classes, batch_size).argmax(dim=1)
    counts = torch.bincount(requested, minlength=num_classes)
    hits = torch.bincount(requested[judged == requested], minlength=num_classes)
    per_class = torch.where(counts > 0, hits.double() / counts.clamp_min(1).double(),
                            torch.full((num_classes,), math.nan, dtype=torch.float64))
    return ConditionalAccuracy(per_class, float(per_class[counts > 0].mean()), counts)


def class_frechet_distances(features: Tensor, labels: Tensor, reference_features: Tensor, reference_labels: Tensor,
                            num_classes: int) -> Tensor:
    """Per class k, the Frechet distance between the ``features`` of the samples requested as k (``labels``) and the
    ``reference_features`` of the real images of class k (``reference_labels``); float64 ``[num_classes]``, NaN for
    a class with fewer than two samples on either side."""
    labels = _check_labels(labels, features.shape[0], num_classes, "labels")
    reference_labels = _check_labels(reference_labels, reference_features.shape[0], num_classes, "reference_labels")
    distances = torch.full((num_classes,), math.nan, dtype=torch.float64)
    for k in range(num_classes):
        mine, theirs = features[labels == k], reference_features[reference_labels == k]
        if mine.shape[0] >= 2 and theirs.shape[0] >= 2:
            distances[k] = frechet_distance(mine, theirs)
    return distances
