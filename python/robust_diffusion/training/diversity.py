"""Diversity and mode coverage of generated samples, in an evaluation network's features (docs/DESIGN.md, Evidence).

The Frechet distance mixes fidelity and diversity into one number: a model that drops a class can score as well
as one that keeps it. These measures separate them, in the same features (``metrics.extract_features``):

- :func:`manifold_metrics`: *precision* and *recall* (Kynkaenniemi et al. 2019, arXiv 1904.06991) and *density*
  and *coverage* (Naeem et al. 2020, arXiv 2002.09797). Each real sample's k-nearest-neighbour ball (radius: the
  distance to its k-th nearest other real sample) approximates the real manifold, and likewise for the
  generated samples.
  precision: the share of generated samples inside some real ball (are samples realistic?); recall: the share of
  real samples inside some generated ball (is the data's variety reproduced?); density: the mean number of real
  balls a generated sample lies in, divided by k (about 1 when the two match, robust to real outliers);
  coverage: the share of real samples whose ball holds at least one generated sample (the share of the data's
  modes the model reaches; a dropped class lowers it by that class's share).
- :func:`class_shares`: the share of samples an evaluation classifier assigns to each class (argmax), and the
  share it assigns confidently (probability above a threshold); :func:`total_variation` compares such a histogram
  with the training set's. A silenced rare class shows as its share falling, where FD may even improve.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["ClassShares", "class_probabilities", "class_shares", "label_shares", "manifold_metrics",
           "total_variation"]


def _check_features(real: Tensor, generated: Tensor, k: int) -> None:
    if real.dim() != 2 or generated.dim() != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"real and generated must be [N, F] and [M, F] feature matrices, got {tuple(real.shape)} "
                         f"and {tuple(generated.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer (neighbours per ball), got {k!r}")
    if real.shape[0] <= k or generated.shape[0] <= k:
        raise ValueError(f"k = {k} needs more than k samples in each set, got {real.shape[0]} real and "
                         f"{generated.shape[0]} generated")


def _distances(a: Tensor, b: Tensor) -> Tensor:
    # Direct differences, not the matrix-product shortcut: a point on a ball's edge must test as inside the same
    # way whichever pair of sets it is measured between.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _radii(features: Tensor, k: int) -> Tensor:
    """Each sample's distance to its k-th nearest other sample of the same set."""
    distances = _distances(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the (k+1)-th smallest: the first is the sample itself (0)


def manifold_metrics(real: Tensor, generated: Tensor, k: int = 5) -> Dict[str, float]:
    """``{"precision", "recall", "density", "coverage"}`` of ``generated [M, F]`` against ``real [N, F]`` features,
    with k nearest neighbours (both papers use 5 on their features); computed in float64 on the CPU. Two independent
    draws of one distribution give all four near 1 (identical sets: precision, recall and coverage 1, density
    (k + 1) / k, since each ball then holds its own centre and its k neighbours)."""
    _check_features(real, generated, k)
    real = real.detach().to("cpu", torch.float64)
    generated = generated.detach().to("cpu", torch.float64)
    real_radii, generated_radii = _radii(real, k), _radii(generated, k)
    between = _distances(generated, real)  # [M, N]
    inside_real = between <= real_radii.unsqueeze(0)  # generated j inside real i's ball
    inside_generated = between <= generated_radii.unsqueeze(1)  # real i inside generated j's ball
    return {"precision": inside_real.any(dim=1).double().mean().item(),
            "recall": inside_generated.any(dim=0).double().mean().item(),
            "density": (inside_real.double().sum() / (k * generated.shape[0])).item(),
            "coverage": inside_real.any(dim=0).double().mean().item()}


class ClassShares(NamedTuple):
    """Per class: the share of samples assigned to it (``argmax``) and the share assigned to it with probability
    above ``threshold`` (``confident``; the rest of the samples are confidently in no class). float64 [C]."""

    argmax: Tensor
    confident: Tensor
    threshold: float


def class_shares(classifier: nn.Module, images: Tensor, num_classes: int, threshold: float = 0.9,
                 batch_size: int = 512) -> ClassShares:
    """How ``classifier`` (logits ``[B, num_classes]``) distributes ``images`` over the classes."""
    if images.shape[0] == 0:
        raise ValueError("class_shares needs at least one image")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    probabilities = class_probabilities(classifier, images, num_classes, batch_size)
    best, label = probabilities.max(dim=1)
    count = float(images.shape[0])
    argmax = torch.bincount(label, minlength=num_classes).double() / count
    confident = torch.bincount(label[best > threshold], minlength=num_classes).double() / count
    return ClassShares(argmax, confident, float(threshold))


def class_probabilities(classifier: nn.Module, images: Tensor, num_classes: int, batch_size: int = 512) -> Tensor:
    """``classifier``'s (logits ``[B, num_classes]``) class probabilities of ``images``, float64 ``[N, num_classes]``
    on the CPU, computed in eval mode (the classifier's mode is restored)."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    with torch.no_grad():
        probabilities = torch.cat([classifier(images[i:i + batch_size].to(device, torch.float32)).softmax(1).cpu()
                                   for i in range(0, images.shape[0], batch_size)]).double()
    classifier.train(was_training)
    if probabilities.shape[1] != num_classes:
        raise ValueError(f"the classifier gives {probabilities.shape[1]} classes, num_classes is {num_classes}")
    return probabilities


def label_shares(labels: Tensor, num_classes: int) -> Tensor:
    """The share of each class among ``labels`` (e.g. the training set's), float64 [num_classes]."""
    if labels.numel() == 0:
        raise ValueError("label_shares needs at least one label")
    return torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes).double() / labels.numel()


def total_variation(shares: Tensor, reference: Tensor) -> float:
    """Half the L1 distance between two class histograms: 0 when equal, 1 when disjoint."""
    if shares.shape != reference.shape:
        raise ValueError(f"the histograms must have the same classes, got {tuple(shares.shape)} and "
                         f"{tuple(reference.shape)}")
    return 0.5 * (shares.double() - reference.double()).abs().sum().item()
