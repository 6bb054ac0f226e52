"""Coherence: is a training sample one of a group, however small, or alone?

Trust (:meth:`InfluenceTracker.trust`) silences a sample the loss keeps finding hard to denoise. A legitimately
rare part of the data (a class that is 3% of the set) is also hard to denoise at first, and a silenced sample is
never learnt, so trust alone erases it with the junk (docs/RESULTS.md, finding 15). What tells the two apart
without labels is coherence: a rare class's members resemble each other, junk resembles nothing.

``coherence(features)`` gives each sample ``min(1, (m / d_i)^2)``, where ``d_i`` is its distance to its ``k``-th
nearest other sample and ``m`` the median of those distances: 1 for a sample at least as close to its neighbours
as the typical one (a member of any group of more than ``k``), falling towards 0 for one far from every other.
:meth:`InfluenceTracker.set_coherence` gates trust with it: ``1 - (1 - trust) * (1 - coherence)``, so a coherent
sample keeps its weight and an isolated one gets its trust (docs/DESIGN.md, Data audit). A coherent contaminant
(many copies of one junk image, a whole foreign class) is kept too: no unsupervised signal can call a group junk.

Features are what the distance is measured in: flattened pixels are enough for the noise images, Gaussian-noised
images and foreign classes of docs/RESULTS.md; an encoder's features (a VAE latent, CLIP) suit photographs better.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["coherence"]


@torch.no_grad()
def coherence(features: Tensor, k: int = 5, *, reference: Optional[int] = 10000, seed: int = 0,
              chunk: int = 512) -> Tensor:
    """Each sample's coherence in ``(0, 1]`` (see the module docstring), float32 on the CPU, ``[N]``.

    Args:
        features: ``[N, ...]`` one row per training sample (images are flattened); float, finite.
        k: which neighbour's distance is measured; a group of more than ``k`` similar samples reads as coherent.
        reference: distances are measured to at most this many samples (a fixed random subset, drawn with
            ``seed``), so the cost is ``N x reference`` distances; ``None``: to all ``N`` (exact, ``N^2``).
        chunk: rows per block of the distance matrix (memory ``chunk x reference`` floats).
    """
    if not isinstance(features, Tensor) or not features.is_floating_point() or features.dim() < 2:
        raise ValueError(f"coherence: features must be a floating tensor [N, ...] with one row per sample, got "
                         f"{type(features).__name__ if not isinstance(features, Tensor) else features.dtype} "
                         f"{list(features.shape) if isinstance(features, Tensor) else ''}".rstrip())
    for name, value in (("k", k), ("chunk", chunk)) + ((("reference", reference),) if reference is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"coherence: {name} must be a positive integer, got {value!r}")
    rows = features.detach().reshape(features.shape[0], -1).to("cpu", torch.float32)
    count = rows.shape[0]
    if not torch.isfinite(rows).all():
        raise ValueError("coherence: features hold NaN or infinite values; clean or drop those samples first")
    size = count if reference is None else min(reference, count)
    if size <= k:
        raise ValueError(f"coherence: k={k} needs more than {k} samples to compare against, got {size}; "
                         f"lower k or pass more samples")
    chosen = torch.arange(count) if size == count else \
        torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    position = torch.full((count,), -1, dtype=torch.int64)
    position[chosen] = torch.arange(size)  # where a sample sits among the reference rows (-1: not there)
    pool = rows[chosen]
    distance = torch.empty(count)
    for start in range(0, count, chunk):
        block = torch.cdist(rows[start:start + chunk], pool)
        mine = position[start:start + chunk]
        inside = (mine >= 0).nonzero().squeeze(1)
        block[inside, mine[inside]] = math.inf  # a sample is not its own neighbour
        distance[start:start + chunk] = block.kthvalue(k, dim=1).values
    typical = distance.median()
    if typical <= 0:  # more than half the samples have k exact duplicates: all of those are coherent
        return torch.where(distance <= 0, 1.0, 0.0).to(torch.float32)
    return (typical / distance.clamp_min(1e-30)).pow(2).clamp(max=1.0).to(torch.float32)
