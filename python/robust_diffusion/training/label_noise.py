"""Label noise as an experiment knob: mismatched (image, label) pairs, as the label-noise literature makes them.

- ``symmetric``: each label is replaced, with probability ``rate``, by one of the *other* classes drawn uniformly.
- ``asymmetric``: each image of a class that has a confusable partner (:data:`CONFUSABLE`) gets that partner's label
  with probability ``rate``; the other classes keep theirs. CIFAR-10 uses the map of Patrini et al. (2017) that the
  label-noise literature (and TDSM, arXiv 2402.17517) flips: truck -> automobile, bird -> airplane, deer -> horse,
  cat <-> dog. Fashion-MNIST has no standard map; ours pairs the classes its classifiers confuse most: T-shirt/top
  <-> Shirt, Pullover <-> Coat, Sandal <-> Sneaker. The share of flipped labels is then ``rate`` times the share of
  images in the mapped classes (0.6 of a balanced Fashion-MNIST).

The mask of flipped labels is returned for evaluation only (finding the flipped pairs, the accuracy of samples per
class); nothing that trains may read it, as for the contamination mask.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import torch
from torch import Tensor

__all__ = ["CONFUSABLE", "LABEL_NOISE_KINDS", "NoisyLabels", "flip_labels"]

LABEL_NOISE_KINDS = ("symmetric", "asymmetric")

#: The asymmetric flips of each benchmark: source class -> the label it is given.
CONFUSABLE: Dict[str, Dict[int, int]] = {
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    "fashion-mnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5},
}


class NoisyLabels(NamedTuple):
    """``labels``: the labels training sees; ``flipped``: which differ from the true ones (evaluation only)."""

    labels: Tensor
    flipped: Tensor


def flip_labels(labels: Tensor, rate: float, kind: str = "symmetric", *, num_classes: int, seed: int = 0,
                dataset: str = "fashion-mnist") -> NoisyLabels:
    """Flip a share ``rate`` of ``labels`` (int [N] in ``[0, num_classes)``) as ``kind`` says, reproducibly for
    ``seed``. ``dataset`` picks the asymmetric map (:data:`CONFUSABLE`)."""
    if kind not in LABEL_NOISE_KINDS:
        raise ValueError(f"label noise kind must be one of {', '.join(LABEL_NOISE_KINDS)}, got {kind!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be a fraction in [0, 1), got {rate!r}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    labels = labels.to(torch.int64).cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(labels.shape, generator=generator, dtype=torch.float64) < rate
    if kind == "symmetric":
        # an offset in [1, num_classes) lands on every other class with the same probability, never on its own
        offset = torch.randint(1, num_classes, labels.shape, generator=generator)
        noisy = torch.where(chosen, (labels + offset) % num_classes, labels)
    else:
        if dataset not in CONFUSABLE:
            raise ValueError(f"asymmetric label noise has a map for {', '.join(CONFUSABLE)}, not for {dataset!r}; "
                             f"use symmetric")
        target = labels.clone()
        for source, partner in CONFUSABLE[dataset].items():
            target[labels == source] = partner
        noisy = torch.where(chosen, target, labels)
    return NoisyLabels(noisy, noisy != labels)
