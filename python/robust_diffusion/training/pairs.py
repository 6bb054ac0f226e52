"""Which (image, label) pairs are mismatched? The signals a class-conditional diffusion model gives, and the
confident-learning baseline they are measured against.

An image under the wrong label is a clean image: its unconditional denoising error is typical, so the influence
weights and trust of the unconditional audit cannot see it. What can is the label itself. A class-conditional
model denoises an image better under the class it shows than under another, most visibly at middle noise levels
where the label decides what the image becomes (at low noise the image itself decides, at high noise nothing
does). :func:`label_errors` measures, for every image, the denoising error under every class label and under the
null label, with the same timesteps and noise for all labels (the paired design of the diffusion classifier, Li et
al. 2023: differences between labels are then not drowned by the draw's noise). :func:`pair_scores` turns them
into scores, each higher for a pair more likely mismatched:

- ``margin``: the given label's error minus the lowest error over all labels (0 when the given label is the one the
  model prefers; :attr:`PairScores.preferred` is that label);
- ``contrast``: the given label's error minus the null label's (a label that does not help the denoiser);
- ``mistrust``: 1 minus the posterior of the given label, ``softmax(-errors / temperature)``, the diffusion
  classifier's probability, which makes the scores of a confident and an unsure model comparable.

:func:`confident_learning_scores` is the baseline (Northcutt et al. 2021, cleanlab): a classifier trained on the
same noisy labels, its out-of-fold probability of the given label; 1 minus it ranks the pairs. Which signal the
audit and the robust conditional training use is decided by evidence (docs/RESULTS.md).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..schedules import Schedule
from .denoising import denoising_errors
from .metrics import FeatureClassifier, _fit, auroc
from .models import null_class_label

__all__ = ["PairScores", "confident_learning_scores", "detection_quality", "label_errors", "pair_scores"]

#: The default noise levels of :func:`label_errors`, as fractions of the schedule's time: the middle, where the
#: label decides what an image becomes.
MIDDLE_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)


@torch.no_grad()
def label_errors(model: nn.Module, schedule: Schedule, images: Tensor, *, levels: Sequence[float] = MIDDLE_LEVELS,
                 draws: int = 1, seed: int = 0, batch_size: int = 256,
                 device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """Mean squared denoising error of every image under every label, ``[N, K + 1]`` float32 on the CPU: columns
    ``0..K-1`` the classes, column ``K`` the null label. Each image is noised at each of ``levels`` with
    ``draws`` noise draws, the same for all its labels. ``model`` is a class-conditional denoiser called as
    ``model(x_t, t, class_labels=y)`` predicting the schedule's training target (epsilon for DDPM, velocity for
    flow matching), e.g. the kit's ``UNet(num_classes=K)`` or a diffusers ``UNet2DModel(num_class_embeds=K + 1)``.
    ``levels``: the noise levels as fractions of the schedule's time (``t = level * T`` on a discrete schedule,
    ``t = level`` for flow matching)."""
    null = null_class_label(model)
    if null is None:
        raise ValueError("label_errors needs a class-conditional model (UNet(num_classes=K), or a diffusers "
                         "UNet2DModel with num_class_embeds); this one takes no class labels")
    # The same seed for every label: each image is noised identically under all of them (the paired design).
    return torch.stack([denoising_errors(model, schedule, images, levels=levels, draws=draws, seed=seed,
                                         batch_size=batch_size, class_labels=label, device=device,
                                         what="label_errors")
                        for label in range(null + 1)], dim=1)


class PairScores(NamedTuple):
    """Per pair, each higher for a pair more likely mismatched (see the module docstring), and the label the model
    prefers (lowest error)."""

    margin: Tensor
    contrast: Tensor
    mistrust: Tensor
    preferred: Tensor


def pair_scores(errors: Tensor, labels: Tensor, *, temperature: Optional[float] = None) -> PairScores:
    """Scores of the pairs ``(image i, labels[i])`` from :func:`label_errors`' ``[N, K + 1]`` errors.
    ``temperature``: the posterior's, default the median over images of the spread (standard deviation) of their
    class errors, so the posterior does not depend on the errors' scale."""
    if errors.dim() != 2 or errors.shape[1] < 3 or labels.shape != errors.shape[:1]:
        raise ValueError(f"pair_scores: errors must be [N, K + 1] (K >= 2 classes and the null label) and labels [N], "
                         f"got {tuple(errors.shape)} and {tuple(labels.shape)}")
    classes = errors[:, :-1].double()
    num_classes = classes.shape[1]
    labels = labels.long()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"pair_scores: labels must lie in [0, {num_classes})")
    given = classes.gather(1, labels[:, None]).squeeze(1)
    best, preferred = classes.min(dim=1)
    if temperature is None:
        temperature = float(classes.std(dim=1).median().clamp_min(1e-12))
    posterior = torch.softmax(-classes / temperature, dim=1).gather(1, labels[:, None]).squeeze(1)
    return PairScores(margin=(given - best).float(), contrast=(given - errors[:, -1].double()).float(),
                      mistrust=(1 - posterior).float(), preferred=preferred)


def confident_learning_scores(images: Tensor, labels: Tensor, *, num_classes: int, folds: int = 4, epochs: int = 2,
                              seed: int = 0, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """The confident-learning baseline: ``folds`` classifiers (the kit's :class:`FeatureClassifier`), each trained
    on the noisy labels of the other folds, give every image its out-of-fold probability of its given label;
    returned as ``1 - p`` ``[N]`` float32 (higher: more likely mismatched)."""
    if folds < 2 or images.shape[0] < folds:
        raise ValueError(f"confident_learning_scores: folds must be at least 2 and at most the number of images, "
                         f"got {folds} for {images.shape[0]}")
    device = torch.device(device) if device is not None else images.device
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    probability = torch.empty(images.shape[0])
    for fold in range(folds):
        held = order[fold::folds]
        kept = torch.ones(images.shape[0], dtype=torch.bool)
        kept[held] = False
        torch.manual_seed(seed + fold)
        model = FeatureClassifier(images.shape[1], num_classes).to(device)
        _fit(model, images[kept], labels[kept].long(), epochs, 128, 2e-3, seed + fold, False, device, False)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(images[held][i:i + 512].to(device)).float().cpu()
                                for i in range(0, held.shape[0], 512)])
        probability[held] = torch.softmax(logits, dim=1).gather(1, labels[held].long()[:, None]).squeeze(1)
    return (1 - probability).float()


def detection_quality(scores: Mapping[str, Tensor], flipped: Tensor) -> Dict[str, Dict[str, float]]:
    """How well each score (``[N]``, higher: more likely mismatched) finds the ``flipped`` pairs (``[N]`` bool):
    ``{name: {"auroc", "precision_at_k"}}``, k the number flipped (NaN without flipped pairs; ties broken by
    index)."""
    flipped = flipped.bool().cpu()
    count = int(flipped.sum())
    result = {}
    for name, score in scores.items():
        if score.shape != flipped.shape:
            raise ValueError(f"detection_quality: score {name!r} has shape {tuple(score.shape)}, the flags "
                             f"{tuple(flipped.shape)}")
        top = torch.argsort(score.cpu(), descending=True, stable=True)[:count]
        result[name] = {"auroc": auroc(score.cpu(), flipped),
                        "precision_at_k": float(flipped[top].float().mean()) if count else math.nan}
    return result
