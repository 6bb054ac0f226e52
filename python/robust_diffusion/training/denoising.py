"""A trained model's denoising error on given images, at fixed noise levels with fixed noise: a measurement that
does not depend on how good its samples look.

:func:`denoising_errors` gives each image's mean squared error of the training target (epsilon for DDPM, velocity
for flow matching) over the noise levels and draws, the noise drawn from ``seed`` alone, so two models, or one
model under two labels, are measured on exactly the same noised images (a paired comparison). It is what the
mismatched-pair scores are made of (:func:`~robust_diffusion.training.pairs.label_errors`) and, per class, how
well a model has learnt each class of held-out images (:func:`class_denoising_errors`): a class that a robust
recipe silences is denoised worse than under the standard MSE, even where neither model's samples are good
enough for a classifier to count them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..schedules import Schedule, prediction_type_for
from .models import model_prediction

__all__ = ["class_denoising_errors", "denoising_errors"]

Labels = Union[None, int, Tensor]


@torch.no_grad()
def denoising_errors(model: nn.Module, schedule: Schedule, images: Tensor, *, levels: Sequence[float],
                     draws: int = 1, seed: int = 0, batch_size: int = 256, class_labels: Labels = None,
                     device: Optional[Union[str, torch.device]] = None, what: str = "denoising_errors") -> Tensor:
    """Each image's mean squared denoising error ``[N]`` (float32, CPU) over ``levels`` (fractions of the
    schedule's time: ``t = level * T`` on a discrete schedule, ``t = level`` for flow matching) and ``draws`` noise
    draws per level, the noise drawn from ``seed`` in the same order whatever the model or labels. ``class_labels``:
    for a class-conditional model, one label for all images or one per image ``[N]``."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{what}: images must be [N, C, H, W] with N > 0, got {tuple(images.shape)}")
    if not levels or draws < 1 or not all(0 < level < 1 for level in levels):
        raise ValueError(f"{what}: give at least one noise level in (0, 1) and one draw, got levels={list(levels)}, "
                         f"draws={draws}")
    prediction_type = prediction_type_for(schedule, None, what)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(class_labels, int):
        class_labels = torch.full((images.shape[0],), class_labels, dtype=torch.long)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    errors = torch.zeros(images.shape[0])
    for level in levels:
        for _ in range(draws):
            noise = torch.randn(images.shape, generator=generator)
            for start in range(0, images.shape[0], batch_size):
                x0 = images[start:start + batch_size].to(device)
                eps = noise[start:start + batch_size].to(device)
                if schedule.discrete:
                    t = torch.full((x0.shape[0],), round(level * schedule.num_timesteps), device=device,
                                   dtype=torch.long)
                else:
                    t = torch.full((x0.shape[0],), level, device=device)
                x_t = schedule.q_sample(x0, t, eps)
                target = schedule.training_target(x0, eps, t, prediction_type)
                time = schedule.model_timestep(t)
                if class_labels is None:
                    output = model(x_t, time)
                else:
                    output = model(x_t, time, class_labels=class_labels[start:start + x0.shape[0]].to(device))
                error = (model_prediction(output, x_t).float() - target).pow(2).flatten(1).mean(1)
                errors[start:start + x0.shape[0]] += error.cpu()
    model.train(was_training)
    return errors / (len(levels) * draws)


#: The noise levels of :func:`class_denoising_errors`: across the schedule, as a sample's training draws are.
ACROSS_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


def class_denoising_errors(model: nn.Module, schedule: Schedule, images: Tensor, labels: Tensor, num_classes: int, *,
                           levels: Sequence[float] = ACROSS_LEVELS, seed: int = 0,
                           device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """Per class, the mean :func:`denoising_errors` of an unconditional ``model`` on ``images`` of that class
    (``labels`` ``[N]``): float64 ``[num_classes]``, NaN for a class with no image."""
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != images.shape[:1]:
        raise ValueError(f"class_denoising_errors: labels must be [N], one per image, got {tuple(labels.shape)} for "
                         f"{images.shape[0]} images")
    errors = denoising_errors(model, schedule, images, levels=levels, seed=seed, device=device,
                              what="class_denoising_errors").double()
    return torch.tensor([errors[labels == k].mean().item() if bool((labels == k).any()) else math.nan
                         for k in range(num_classes)], dtype=torch.float64)
