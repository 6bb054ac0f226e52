"""The adaptive scale's batch statistic and state update written with plain torch ops: the Python
implementation RobustDiffusionLoss used before the bucket_statistic / adaptive_scale_update operators
(docs/DESIGN.md, Scale), kept as their reference. Nothing here calls robust_diffusion."""

from typing import Optional, Tuple

import torch
from torch import Tensor


def bucket_medians(penalty: Tensor, bucket: Tensor, num_buckets: int, floor: float) -> Tuple[Tensor, Tensor]:
    """Per bucket the median penalty (NaN: no sample, below floor, or the batch refused), and 1 when the batch
    is refused (a non-finite penalty, or no bucket left)."""
    member = bucket.unsqueeze(0) == torch.arange(num_buckets).unsqueeze(1)
    values = torch.where(member, penalty.float().unsqueeze(0), torch.full(member.shape, float("nan")))
    medians = torch.nanmedian(values, dim=1).values
    accepted = torch.isfinite(medians) & (medians >= floor) & torch.isfinite(penalty).all()
    medians = torch.where(accepted, medians, torch.full_like(medians, float("nan")))
    return medians, (~accepted.any()).to(torch.int64)


def as_statistic(medians: Tensor, refused: Tensor) -> Tensor:
    """The operators' statistic layout: sums of accepted medians, their counts, refused batches."""
    present = ~torch.isnan(medians)
    return torch.cat([torch.nan_to_num(medians), present.float(), refused.float().reshape(1)])


def update(state: dict, statistic: Tensor, ok: Optional[bool], momentum: float, max_ratio: float, floor: float):
    """Takes a statistic into state (bucket_penalty, initialized, skipped_updates, limited_updates), in place."""
    k = state["bucket_penalty"].numel()
    total, count = statistic[:k], statistic[k:2 * k]
    medians = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("nan")))
    skipped = statistic[2 * k].round().to(torch.int64)
    if ok is not None:
        keep = torch.tensor(ok)
        skipped = skipped + (~keep & (count > 0).any()).to(torch.int64)
        medians = torch.where(keep, medians, torch.full_like(medians, float("nan")))
    current, initialized = state["bucket_penalty"], state["initialized"]
    present = ~torch.isnan(medians)
    seed = torch.where(present, medians, torch.nanmedian(medians))
    seeded = torch.where(torch.isnan(seed), current, seed)
    bounded = torch.minimum(medians, current * max_ratio)
    ema = momentum * current + (1.0 - momentum) * bounded
    updated = torch.where(initialized, torch.where(present, ema, current), seeded)
    limited = initialized & present & (bounded != medians)
    state["bucket_penalty"].copy_(updated.clamp_min(floor))
    state["limited_updates"].add_(limited.sum())
    state["skipped_updates"].add_(skipped)
    state["initialized"].copy_(initialized | present.any())
