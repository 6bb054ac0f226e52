"""InfluenceTracker: which training samples does the robust loss trust least?

Every robust loss gives each sample of a batch an influence weight ``w_b`` (``RobustDiffusionLoss.last_influence``:
1 for a sample at its noise level's typical error, near 0 for an outlier; docs/DESIGN.md, Losses) and a penalty ``R_b`` (its mean squared error with the default
``dim_reduction="mean"``). One batch says little about a sample; averaged over the many times a sample is drawn
(at many noise levels) the weight ranks the training set from least to most trusted: the data audit of
``python -m robust_diffusion.audit`` and of the Trainer. Add it to any training loop::

    tracker = rd.InfluenceTracker(len(dataset), num_timesteps=schedule.num_timesteps).to(device)
    for x0, index in loader:                        # the dataset returns each sample's index
        ...
        loss = criterion(model(x_t, t), noise, t)  # criterion = rd.RobustDiffusionLoss(...)
        tracker.update(index, criterion.last_influence, criterion.last_penalty, t)
    for row in tracker.table()[:20]:                 # the 20 least-trusted samples
        print(row)

``rd.influence_weights(...)`` (with the ``penalty`` left out) ranks the same as ``last_influence`` (it gives
phi'(delta) itself, not relative to a typical sample). To train with
the result, ``weight=tracker.trust(index)`` in the criterion's call weights each sample by how much the loss
trusted it at low noise (:meth:`InfluenceTracker.trust`; the Trainer's ``sample_trust``);
``tracker.set_coherence(rd.coherence(images))`` keeps the weight of samples that have close neighbours, so a rare
but coherent group is not silenced with the junk (docs/DESIGN.md, Data audit).

What is kept, per sample (float64, on the tracker's device, in ``state_dict``):

- ``influence_sum``, ``influence_count``: the sum of its influence weights and how often it was drawn. A draw
  whose weight is not finite (NaN data, an overflowed forward pass) is not counted, so one bad step cannot turn
  a sample's average into NaN.
- ``penalty_sum``, ``penalty_count``: the same for the penalty (draws with a finite penalty).
- the same four per noise-level bucket, ``bucket_influence_sum`` ... ``[num_samples, num_buckets]``: bucket
  ``k`` holds the draws whose timestep ``t`` has ``floor(t * num_buckets / num_timesteps) == k``, equal ranges of
  ``t`` as in the adaptive scale of :class:`~robust_diffusion.RobustDiffusionLoss` (the same buckets with the
  same ``num_buckets``; default 10 of 1000 steps). A sample that is an outlier only at some noise levels shows
  there. Memory: ``32 * (num_buckets + 1)`` bytes a sample (``num_buckets=1``: 64).

``update()`` reads nothing on the host: it is a few ``index_add_`` on the device. Its arguments are checked with
one-line errors that name them; an index or timestep out of range raises a ValueError at once when it comes as
a CPU tensor (as a DataLoader gives it) and an asynchronous device assertion when it already lies on an
accelerator (reading it there would cost a sync), like the timestep check of ``RobustDiffusionLoss``.

Data parallel: each rank's ``update()`` only sees the indices of its own batches. Either pass ``sync=True`` to a
result (``ranking(sync=True)``, or call :meth:`InfluenceTracker.synchronized` once for several): the sums are then
all-reduced over the default process group (a collective: every rank must call it); or give every rank the
whole global batch (all-gather indices, weights, penalties and timesteps before ``update()``, as the Trainer
does) and build the tracker with ``gathered=True``: it is then the same on every rank, and ``sync=True`` does
nothing (so it can never double count).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ._buffers import DtypeKeepingModule
from .schedules import check_count

__all__ = ["InfluenceTracker"]

#: The state, one float64 buffer each: totals [num_samples] and per noise-level bucket [num_samples, num_buckets].
_TOTALS = ("influence_sum", "influence_count", "penalty_sum", "penalty_count")
_BUCKETS = tuple(f"bucket_{name}" for name in _TOTALS)
_STATE_VERSION = 1

IndexLike = Union[Tensor, Sequence[int]]


class InfluenceTracker(DtypeKeepingModule):
    """Per-sample averages of a robust loss's influence weights and penalties, overall and per noise level.

    See the module docstring for what is kept and why.

    Args:
        num_samples: the size of the training set; ``update()`` takes dataset indices in ``[0, num_samples)``.
        num_buckets: noise-level buckets (equal ranges of ``t``); 1 keeps only the totals' worth.
        num_timesteps: the schedule's number of steps T; timesteps lie in ``[0, T)``. ``None`` for a continuous
            schedule: ``update()`` then takes each draw's noise-level ``bucket`` (``RobustDiffusionLoss.buckets(t)``,
            equal ranges of log-SNR) instead of ``t``.
        gathered: every rank's ``update()`` is given the whole global batch (the tracker is then identical on every
            rank), so results need no synchronisation and ``sync=True`` does nothing.
    """

    def __init__(self, num_samples: int, *, num_buckets: int = 10, num_timesteps: Optional[int] = 1000,
                 gathered: bool = False):
        super().__init__()
        for name, value in (("num_samples", num_samples), ("num_buckets", num_buckets),
                            ("num_timesteps", num_timesteps)):
            if name == "num_timesteps" and value is None:
                continue
            check_count(f"InfluenceTracker: {name}", value)
        if num_timesteps is not None and num_buckets > num_timesteps:
            raise ValueError(f"InfluenceTracker: num_buckets ({num_buckets}) must not exceed num_timesteps "
                             f"({num_timesteps})")
        self.num_samples = num_samples
        self.num_buckets = num_buckets
        self.num_timesteps = num_timesteps
        self.gathered = bool(gathered)
        for name in _TOTALS:
            self.register_buffer(name, torch.zeros(num_samples, dtype=torch.float64))
        for name in _BUCKETS:
            self.register_buffer(name, torch.zeros(num_samples, num_buckets, dtype=torch.float64))
        # Each sample's coherence (robust_diffusion.coherence), which gates trust; None: not set. Not in the
        # state: it is a function of the data, computed again by whoever builds the tracker.
        self.register_buffer("coherence", None, persistent=False)

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, num_buckets={self.num_buckets}, "
                f"num_timesteps={self.num_timesteps}, gathered={self.gathered}")  # None: continuous

    @property
    def device(self) -> torch.device:
        return self.influence_sum.device

    # ------------------------------------------------------------------ accumulate
    @torch.no_grad()
    def update(self, indices: IndexLike, influence: Tensor, penalty: Optional[Tensor] = None,
               t: Optional[Tensor] = None, *, bucket: Optional[Tensor] = None) -> None:
        """Take in one batch: ``indices`` [B] the dataset index of each sample (int), ``influence`` [B] their
        influence weights (``RobustDiffusionLoss.last_influence`` or ``rd.influence_weights(...)``), ``penalty``
        [B] their penalties (``last_penalty``; optional) and ``t`` [B] their timesteps, or, on a continuous schedule
        (``num_timesteps=None``), ``bucket`` [B] their noise-level buckets (``criterion.buckets(t)``); one of the
        two is required when ``num_buckets > 1``. Non-finite weights and penalties are not counted. No host sync;
        inputs are moved to the tracker's device (keep it on the training device: ``tracker.to(device)``)."""
        indices = self._check_integers("indices", indices, None, self.num_samples, "dataset indices")
        size = indices.shape[0]
        influence = self._check_values("influence", influence, size)
        penalty = self._check_values("penalty", penalty, size) if penalty is not None else None
        if bucket is not None:
            if t is not None:
                raise ValueError("InfluenceTracker.update: give t or bucket, not both")
            bucket = self._check_integers("bucket", bucket, size, self.num_buckets, "noise-level buckets")
        elif t is None:
            if self.num_buckets > 1:
                raise ValueError(f"InfluenceTracker.update: t (or bucket) is required with num_buckets="
                                 f"{self.num_buckets} (the statistics are kept per noise level): pass the batch's "
                                 f"timesteps, or build the tracker with num_buckets=1")
            bucket = torch.zeros_like(indices)
        elif self.num_timesteps is None:
            raise ValueError("InfluenceTracker.update: this tracker has no timesteps (num_timesteps=None, a continuous "
                             "schedule): pass bucket=criterion.buckets(t) instead of t")
        else:
            t = self._check_integers("t", t, size, self.num_timesteps, "timesteps of the schedule")
            bucket = torch.div(t * self.num_buckets, self.num_timesteps, rounding_mode="floor")
        cell = indices * self.num_buckets + bucket  # the flat index into the [num_samples, num_buckets] buffers
        self._add("influence", indices, cell, influence)
        if penalty is not None:
            self._add("penalty", indices, cell, penalty)

    def _add(self, what: str, indices: Tensor, cell: Tensor, values: Tensor) -> None:
        counted = torch.isfinite(values)
        values = torch.where(counted, values, torch.zeros_like(values))
        counted = counted.to(torch.float64)
        self._buffers[f"{what}_sum"].index_add_(0, indices, values)
        self._buffers[f"{what}_count"].index_add_(0, indices, counted)
        self._buffers[f"bucket_{what}_sum"].view(-1).index_add_(0, cell, values)
        self._buffers[f"bucket_{what}_count"].view(-1).index_add_(0, cell, counted)

    def _check_integers(self, name: str, value: Any, size: Optional[int], upper: int, what: str,
                        method: str = "update") -> Tensor:
        where = f"InfluenceTracker.{method}: {name}"
        value = torch.as_tensor(value) if not isinstance(value, Tensor) else value.detach()
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{where} must hold integers ({what}), got dtype {value.dtype}")
        if value.dim() != 1 or (size is not None and value.shape[0] != size):
            wanted = "a 1-D tensor" + (f" of {size} entries (one per sample of indices)" if size is not None else "")
            raise ValueError(f"{where} must be {wanted}, got shape {list(value.shape)}")
        message = f"{where} must lie in [0, {upper}) ({what})"
        if value.device.type == "cpu":
            if value.numel():
                low, high = int(value.min()), int(value.max())
                if low < 0 or high >= upper:
                    raise ValueError(f"{message}, got values in [{low}, {high}]")
        elif value.device.type != "meta":
            torch._assert_async(((value >= 0) & (value < upper)).all(), message)
        return value.to(device=self.device, dtype=torch.int64, non_blocking=True)

    def _check_values(self, name: str, value: Any, size: int) -> Tensor:
        where = f"InfluenceTracker.update: {name}"
        value = torch.as_tensor(value) if not isinstance(value, Tensor) else value.detach()
        if not value.is_floating_point():
            raise ValueError(f"{where} must be a floating tensor (one value per sample), got dtype {value.dtype}")
        if value.dim() != 1 or value.shape[0] != size:
            raise ValueError(f"{where} must be a 1-D tensor of {size} entries (one per sample of indices), "
                             f"got shape {list(value.shape)}")
        return value.to(device=self.device, dtype=torch.float64, non_blocking=True)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget everything taken in so far."""
        for name in _TOTALS + _BUCKETS:
            self._buffers[name].zero_()

    @torch.no_grad()
    def set_coherence(self, coherence: Optional[Tensor]) -> "InfluenceTracker":
        """Gate :meth:`trust` by each sample's coherence (``rd.coherence(features)``, ``[num_samples]`` in [0, 1]):
        trust becomes ``1 - (1 - trust) * (1 - coherence)``, so a member of a coherent group, however rare, keeps
        its weight and an isolated sample gets its trust (docs/DESIGN.md, Data audit). ``None`` removes the gate.
        Not saved in ``state_dict`` (it is a function of the data): set it again after loading."""
        if coherence is None:
            self.coherence = None
            return self
        where = "InfluenceTracker.set_coherence: coherence"
        if not isinstance(coherence, Tensor) or not coherence.is_floating_point() or coherence.dim() != 1 \
                or coherence.shape[0] != self.num_samples:
            shape = list(coherence.shape) if isinstance(coherence, Tensor) else type(coherence).__name__
            raise ValueError(f"{where} must be a floating 1-D tensor of {self.num_samples} entries (one per sample, "
                             f"rd.coherence(features)), got {shape}")
        if not bool(((coherence >= 0) & (coherence <= 1)).all()):
            raise ValueError(f"{where} must lie in [0, 1] (rd.coherence's values); it holds values outside it or NaN")
        self.coherence = coherence.detach().to(self.device, torch.float64)
        return self

    # ------------------------------------------------------------------ results
    def synchronized(self) -> "InfluenceTracker":
        """A tracker whose sums are those of every rank (one all-reduce over the default process group; every rank
        must call it). Without ``torch.distributed``, with one rank, or with ``gathered=True`` nothing needs adding
        up and the tracker itself comes back."""
        import torch.distributed as dist

        if self.gathered or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        names = _TOTALS + _BUCKETS
        flat = torch.cat([self._buffers[name].reshape(-1) for name in names])
        dist.all_reduce(flat)
        result = copy.deepcopy(self)
        result.gathered = True
        start = 0
        for name in names:
            buffer = result._buffers[name]
            buffer.copy_(flat[start:start + buffer.numel()].view_as(buffer))
            start += buffer.numel()
        return result

    def _source(self, sync: bool) -> "InfluenceTracker":
        return self.synchronized() if sync else self

    def _mean(self, what: str, per_bucket: bool, sync: bool) -> Tensor:
        source = self._source(sync)
        prefix = "bucket_" if per_bucket else ""
        total = source._buffers[f"{prefix}{what}_sum"].detach().cpu()
        count = source._buffers[f"{prefix}{what}_count"].detach().cpu()
        return torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, math.nan))

    def mean_influence(self, per_bucket: bool = False, sync: bool = False) -> Tensor:
        """Each sample's mean influence weight, float64 on the CPU, ``[num_samples]`` (``per_bucket``:
        ``[num_samples, num_buckets]``); NaN where never counted. Low = little trusted."""
        return self._mean("influence", per_bucket, sync)

    def mean_penalty(self, per_bucket: bool = False, sync: bool = False) -> Tensor:
        """Each sample's mean penalty R_b (its mean squared error for the divergence losses), float64 on the CPU;
        NaN where never given (also when ``update()`` was never passed a penalty)."""
        return self._mean("penalty", per_bucket, sync)

    def counts(self, per_bucket: bool = False, sync: bool = False) -> Tensor:
        """How many times each sample was counted (drawn with a finite influence weight), int64 on the CPU."""
        source = self._source(sync)
        name = "bucket_influence_count" if per_bucket else "influence_count"
        return source._buffers[name].detach().cpu().round().to(torch.int64)

    @torch.no_grad()
    def trust(self, indices: Optional[IndexLike] = None, *, low_noise: float = 0.5, sync: bool = False) -> Tensor:
        """Each sample's *trust*, one loss weight in ``[0, 1]`` for all noise levels (docs/DESIGN.md, Data audit):
        its mean influence weight over its draws at low noise, ``t < low_noise * T`` (at least the first bucket),
        each draw's weight taken relative to the training set's median in its bucket, capped at 1. A sample not
        yet drawn there has trust 1, as has a bucket whose median weight is not positive (no information).
        With :meth:`set_coherence`, a coherent sample's trust is raised towards 1 (``1 - (1 - trust) *
        (1 - coherence)``), so a rare but coherent group is not silenced with the junk.

        Why: at high noise every image is mostly noise, so a junk image's error is typical there and its
        per-draw influence weight stays near a clean image's (docs/RESULTS.md, finding 11); its low-noise weights
        give it away. Multiply each sample's loss by its trust (``criterion(out, target, t,
        weight=tracker.trust(index))``; the Trainer's ``sample_trust``) to silence it at every noise level.

        ``indices`` [B]: the batch's dataset indices (default: every sample). float32 on the tracker's device;
        no host sync (one ``nanmedian`` over ``num_samples`` x the low-noise buckets)."""
        if isinstance(low_noise, bool) or not isinstance(low_noise, (int, float)) or not 0 < low_noise <= 1:
            raise ValueError(f"InfluenceTracker.trust: low_noise must be a fraction of the timesteps in (0, 1], "
                             f"got {low_noise!r}")
        source = self._source(sync)
        low = max(1, int(math.floor(low_noise * source.num_buckets + 1e-9)))
        total, count = source.bucket_influence_sum[:, :low], source.bucket_influence_count[:, :low]
        mean = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, math.nan))
        median = torch.nanmedian(mean, dim=0).values  # NaN for a bucket nobody was drawn in
        informative = median > 0
        relative = torch.where(informative & (count > 0), mean / torch.where(informative, median, 1.0), 0.0)
        draws = torch.where(informative, count, 0.0)
        drawn = draws.sum(dim=1)
        trust = torch.where(drawn > 0, (relative * draws).sum(dim=1) / drawn.clamp_min(1.0), 1.0).clamp(max=1.0)
        if self.coherence is not None:
            trust = 1 - (1 - trust) * (1 - self.coherence)
        if indices is not None:
            trust = trust[self._check_integers("indices", indices, None, self.num_samples, "dataset indices",
                                               method="trust")]
        return trust.to(torch.float32)

    def ranking(self, sync: bool = False) -> Tensor:
        """Sample indices (int64), least trusted first: ascending mean influence weight, ties broken by the
        higher mean penalty, then by index. Samples never counted come last, in index order."""
        source = self._source(sync)
        return _ranking(source.mean_influence(), source.mean_penalty(), source.counts())

    def table(self, sync: bool = False) -> List[Dict[str, Union[int, float]]]:
        """One row per sample, in :meth:`ranking` order: ``rank`` (1 = least trusted), ``index``,
        ``mean_influence``, ``mean_penalty`` (NaN where unknown) and ``times_seen``."""
        source = self._source(sync)
        mean, penalty, count = source.mean_influence(), source.mean_penalty(), source.counts()
        order = _ranking(mean, penalty, count)
        mean, penalty, count = mean[order].tolist(), penalty[order].tolist(), count[order].tolist()
        return [{"rank": rank + 1, "index": index, "mean_influence": mean[rank], "mean_penalty": penalty[rank],
                 "times_seen": count[rank]} for rank, index in enumerate(order.tolist())]

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict[str, int]:
        return {"version": _STATE_VERSION, "num_timesteps": self.num_timesteps}

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _load_from_state_dict, before anything is copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse, with a one-line ValueError naming the key, a state of another size, bucket count or schedule,
        of another dtype, with non-finite sums or with counts that are not non-negative whole numbers, before
        anything is copied."""
        where = "InfluenceTracker.load_state_dict"
        known = set(_TOTALS + _BUCKETS + ("_extra_state",))
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):] not in known and "." not in key[len(prefix):]:
                    raise ValueError(f"{where}: unexpected key {key!r} (not a state of an InfluenceTracker?)")
        for name in _TOTALS + _BUCKETS:
            key = prefix + name
            if key not in state_dict:
                if strict:
                    raise ValueError(f"{where}: missing key {key!r} (not a state of an InfluenceTracker?)")
                continue
            value, mine = state_dict[key], self._buffers[name]
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: {key} must be a tensor, got {type(value).__name__}")
            if value.shape != mine.shape:
                raise ValueError(f"{where}: {key} has shape {list(value.shape)}, this tracker needs "
                                 f"{list(mine.shape)} (num_samples={self.num_samples}, num_buckets="
                                 f"{self.num_buckets}): a state of another dataset or bucket count")
            if value.dtype != torch.float64:
                raise ValueError(f"{where}: {key} must be float64, got {value.dtype}")
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"{where}: {key} holds {bad} non-finite value(s) (a corrupted state?)")
            if name.endswith("_count") and bool(((value < 0) | (value != value.round())).any()):
                raise ValueError(f"{where}: {key} must hold non-negative whole numbers (a corrupted state?)")
        key = prefix + "_extra_state"
        if key in state_dict:
            extra = state_dict[key]
            if not isinstance(extra, dict) or extra.get("num_timesteps") != self.num_timesteps:
                found = extra.get("num_timesteps") if isinstance(extra, dict) else type(extra).__name__
                raise ValueError(f"{where}: {key} says num_timesteps={found}, this tracker has "
                                 f"{self.num_timesteps} (its buckets would mean other noise levels)")
        elif strict:
            raise ValueError(f"{where}: missing key {key!r} (not a state of an InfluenceTracker?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _ranking(mean: Tensor, penalty: Tensor, count: Tensor) -> Tensor:
    """Stable sorts from the least to the most significant key: index, penalty (descending), mean influence,
    never-counted last."""
    order = torch.arange(mean.shape[0])
    by_penalty = torch.where(torch.isnan(penalty), torch.full_like(penalty, -math.inf), penalty)
    order = order[torch.sort(-by_penalty[order], stable=True).indices]
    by_influence = torch.where(count > 0, mean, torch.full_like(mean, math.inf))
    return order[torch.sort(by_influence[order], stable=True).indices]
