"""AdaptiveScale: the running, fault-tolerant estimate of a typical penalty per noise level.

:class:`~robust_diffusion.RobustDiffusionLoss` divides each sample's penalty by ``temperature`` times this estimate
at the sample's noise level, so an outlier is "``temperature`` times worse than a typical sample here" whatever the
data dimension, dataset or schedule. The estimate is an EMA of the batch median penalty per noise-level bucket,
kept in buffers (saved in ``state_dict``) and averaged over data-parallel ranks. Why it is built this way, and what
a bad batch can and cannot do to it: docs/DESIGN.md, Scale and Failure behaviour.

The arithmetic is two operators (``bucket_statistic``, ``adaptive_scale_update``; csrc/math/adaptive_scale.h), so a
training call adds two kernels and no host sync. This module holds the state, decides when a batch's statistic
enters it (at the forward pass, or staged until :meth:`AdaptiveScale.step` after the optimizer step), and keeps a
host-side copy of whether it has been seeded, so that a step never syncs to learn it.
"""

from typing import Optional

import torch
from torch import Tensor

from ._buffers import DtypeKeepingModule
from .functional import PENALTY_FLOOR
from .schedules import check_count

__all__ = ["AdaptiveScale", "BUCKET_LOG_SNR_RANGE", "MAX_UPDATE_RATIO", "PENALTY_FLOOR", "UPDATE_MODES",
           "log_snr_buckets"]

#: An accepted bucket median is taken only up to this factor times the bucket's current value.
MAX_UPDATE_RATIO = 2.0
#: Continuous schedules: the buckets split this log-SNR range into equal parts, from the least noisy (bucket 0,
#: everything above 10) to the noisiest (everything below -10). It covers the training noise levels of the usual
#: processes (flow matching with logit-normal times: about [-4, 4]; SD3's shift 3: 2.2 lower; EDM's log-normal
#: sigma: about [-2.4, 7.2]; DDPM's linear schedule: [-10.1, 9.2]).
BUCKET_LOG_SNR_RANGE = (-10.0, 10.0)
#: When a training batch's statistic enters the state: at the end of its forward pass, or at :meth:`step`.
UPDATE_MODES = ("forward", "step")


class AdaptiveScale(DtypeKeepingModule):
    """The per-bucket typical penalty of :class:`~robust_diffusion.RobustDiffusionLoss` (its ``adaptive_scale``).

    Buffers (float32 and int64 whatever the module around it is cast to; saved in ``state_dict``):
    ``bucket_penalty`` [K] the running typical penalty per bucket (1 until seeded), ``initialized`` whether a batch
    has seeded it, ``skipped_updates`` the batch statistics refused (non-finite, all zero, or from a step reported
    as skipped) and ``limited_updates`` the bucket updates clamped to :data:`MAX_UPDATE_RATIO` times the bucket.

    Args:
        num_buckets: K, the noise-level buckets.
        momentum: EMA momentum of the per-bucket medians, in [0, 1).
        update: ``"forward"``: :meth:`observe` takes a batch in at once; ``"step"``: it stages the batch, and
            :meth:`step`, called after the optimizer step, commits what was staged (the statistics of several
            forward passes, as in gradient accumulation, averaged) or drops it when the step was skipped.
    """

    staged_statistic: Optional[Tensor]

    def __init__(self, num_buckets: int, momentum: float = 0.9, update: str = "forward"):
        super().__init__()
        self.check_settings(num_buckets, momentum, update)
        self.num_buckets = num_buckets
        self.momentum = float(momentum)
        self.update = update
        self.max_update_ratio = MAX_UPDATE_RATIO  # attributes, so TorchScript sees them
        self.penalty_floor = PENALTY_FLOOR
        self.register_buffer("bucket_penalty", torch.ones(num_buckets))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("limited_updates", torch.zeros((), dtype=torch.int64))
        # update="step": the sum of the statistics staged since the last step(), in bucket_statistic's layout. Not
        # saved: a resumed run redoes that step.
        self.staged_statistic = None
        # Whether the host knows `initialized` is set. Until it does, each batch is scored against its own medians
        # (provisional), which is right either way; learning it never costs a sync (_learn_if_seeded).
        self.seeded_on_host = False
        self._seeded_copy = None  # CUDA: (pinned host copy of `initialized`, the event that marks it landed)

    @staticmethod
    def check_settings(num_buckets: int, momentum: float, update: str) -> None:
        """The constructor's arguments, each refused with a message that names it."""
        check_count("num_buckets", num_buckets)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, momentum={self.momentum}, update={self.update!r}"

    def typical(self, bucket: Tensor, penalty_at_unit_scale: Optional[Tensor] = None) -> Tensor:
        """The typical penalty of each sample's bucket. Before the state is seeded, pass the batch's penalties at
        scale 1 (``penalty_at_unit_scale``): the batch is then scored against what it would seed (its own bucket
        medians; the median over buckets where its bucket has none). Changes no state."""
        typical = self.bucket_penalty
        if penalty_at_unit_scale is not None:
            typical = self._provisional(penalty_at_unit_scale, bucket)
        return typical[bucket]

    def _provisional(self, penalty: Tensor, bucket: Tensor) -> Tensor:
        """The state where it is seeded (a scripted module that loaded a seeded state cannot know it on the host),
        else what this batch's statistic would seed it to."""
        with torch.no_grad():
            seeded = self.bucket_penalty.clone()
            counter = torch.zeros((), dtype=torch.int64, device=seeded.device)
            never = torch.zeros((), dtype=torch.bool, device=seeded.device)
            torch.ops.robust_diffusion.adaptive_scale_update(
                seeded, never, counter, counter.clone(), self.statistic(penalty, bucket), None, self.momentum,
                self.max_update_ratio, self.penalty_floor)
            provisional = torch.where(self.initialized, self.bucket_penalty, seeded)
        return provisional

    def needs_provisional(self) -> bool:
        """Whether a batch must be scored against its own medians: the host does not know the state is seeded
        (a scripted module reads only its own flag)."""
        if not self.seeded_on_host and not torch.jit.is_scripting():
            self._collect_seeded_copy()
        return not self.seeded_on_host

    def statistic(self, penalty: Tensor, bucket: Tensor) -> Tensor:
        """A batch's statistic (``bucket_statistic``): per bucket its median penalty with count 1, or nothing (no
        sample, a median below PENALTY_FLOOR: no scale information); a batch with a non-finite penalty (a forward
        pass that overflowed, NaN data: GradScaler will skip that step) or with no bucket left is refused whole and
        counted. Averaged over data-parallel ranks."""
        statistic = torch.ops.robust_diffusion.bucket_statistic(penalty, bucket, self.num_buckets, self.penalty_floor)
        if not torch.jit.is_scripting():
            statistic = _average_over_ranks(statistic)
        return statistic

    def observe(self, penalty: Tensor, bucket: Tensor) -> None:
        """Take a training batch's penalties (at scale 1, detached) in: at once (``update="forward"``) or staged
        for :meth:`step`."""
        statistic = self.statistic(penalty, bucket)
        if self.update == "forward":
            self._commit(statistic, None)
        else:
            staged = self.staged_statistic
            self.staged_statistic = statistic if staged is None else staged + statistic

    @torch.jit.export
    def step(self, ok: Optional[Tensor] = None) -> None:
        """``update="step"``: commit the statistics staged since the last call, or, when ``ok`` (a bool, or a
        one-element bool tensor such as ``torch.isfinite(grad_norm)``) is False, drop them and count the step as
        skipped. Call it after the optimizer step; with a GradScaler, pass the scaler's own test (any non-finite
        gradient) so a step it skips leaves no trace. No host sync. Does nothing with ``update="forward"``."""
        if not torch.jit.is_scripting():
            ok = _step_flag(ok)
        staged = self.staged_statistic
        if self.update != "step" or staged is None:
            return
        if ok is not None:
            ok = ok.to(self.bucket_penalty.device)
        self._commit(staged, ok)
        self.staged_statistic = None

    def _commit(self, statistic: Tensor, ok: Optional[Tensor]) -> None:
        """Move the state towards a statistic, in place (docs/DESIGN.md, Scale): the first acceptable one seeds
        every bucket, later ones are clamped to MAX_UPDATE_RATIO times the bucket, then averaged in by the EMA;
        ``ok`` False drops it. Then the host's copy of the seeded flag follows, without a sync."""
        torch.ops.robust_diffusion.adaptive_scale_update(
            self.bucket_penalty, self.initialized, self.skipped_updates, self.limited_updates, statistic, ok,
            self.momentum, self.max_update_ratio, self.penalty_floor)
        if self.seeded_on_host:
            return
        if torch.jit.is_scripting():
            self.seeded_on_host = True  # TorchScript cannot read a tensor on the host: the first attempt seeds
        else:
            self._send_seeded_copy()

    @torch.jit.unused
    def _send_seeded_copy(self) -> None:
        """After an update attempt, which need not seed the state (a refused first statistic, a skipped first
        step): on the CPU the flag is read at once; on a GPU it is copied to pinned memory without blocking, and a
        later call reads it once its event has passed; compiled code cannot read it and takes the first attempt
        as seeding."""
        flag = self.initialized
        if torch.compiler.is_compiling() or flag.device.type == "meta":
            self.seeded_on_host = True
        elif flag.device.type == "cuda":
            host_copy = torch.empty((), dtype=torch.bool, pin_memory=True)
            host_copy.copy_(flag, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
            self._seeded_copy = (host_copy, landed)
        else:  # the CPU, or another accelerator (one read per attempt until seeded)
            self.seeded_on_host = bool(flag)

    @torch.jit.unused
    def _collect_seeded_copy(self) -> None:
        pending = self._seeded_copy
        if pending is not None and not torch.compiler.is_compiling() and pending[1].query():
            self.seeded_on_host = bool(pending[0])
            self._seeded_copy = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        penalty = state_dict.get(prefix + "bucket_penalty")
        if isinstance(penalty, Tensor) and not bool((torch.isfinite(penalty) & (penalty >= PENALTY_FLOOR)).all()):
            raise ValueError(f"RobustDiffusionLoss.load_state_dict: {prefix}bucket_penalty must be finite and at "
                             f"least {PENALTY_FLOOR:g}, got {penalty.tolist()} (a corrupted checkpoint?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.seeded_on_host = bool(self.initialized)
        self._seeded_copy = None


def log_snr_buckets(log_snr: Tensor, num_buckets: int) -> Tensor:
    """The noise-level bucket of each log-SNR on a continuous schedule: ``num_buckets`` equal ranges of
    :data:`BUCKET_LOG_SNR_RANGE`, 0 the least noisy, the end buckets open (+-inf included). int64."""
    low, high = BUCKET_LOG_SNR_RANGE
    position = (high - log_snr) * (num_buckets / (high - low))
    return torch.floor(position).clamp(0, num_buckets - 1).long()


def _step_flag(ok) -> Optional[Tensor]:
    """``step``'s ``ok`` as a bool tensor; a float (say, the gradient norm itself, where its finiteness was meant)
    is refused rather than read as true."""
    if ok is None or isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.numel() == 1:
        return ok
    if isinstance(ok, bool):
        return torch.tensor(ok)
    if isinstance(ok, Tensor):
        raise ValueError(f"RobustDiffusionLoss.step: ok must be a bool or a one-element bool tensor (e.g. "
                         f"torch.isfinite(grad_norm)), got a {ok.dtype} tensor of shape {tuple(ok.shape)}")
    raise TypeError(f"RobustDiffusionLoss.step: ok must be a bool or a one-element bool tensor (e.g. "
                    f"torch.isfinite(grad_norm)), got {type(ok).__name__}")


def _average_over_ranks(statistic: Tensor) -> Tensor:
    """A batch statistic with each bucket's median averaged over the ranks that saw it (count 1) and the refused
    rank-batches summed (one all-reduce), so every rank keeps identical state."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return statistic
    dist.all_reduce(statistic)
    k = (statistic.numel() - 1) // 2
    total, count = statistic[:k], statistic[k:2 * k]
    present = count > 0
    averaged = torch.where(present, total / count.clamp_min(1.0), torch.zeros_like(total))
    return torch.cat([averaged, present.float(), statistic[2 * k:]])
