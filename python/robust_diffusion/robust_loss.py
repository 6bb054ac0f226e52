"""RobustDiffusionLoss: one module combining a loss, its scale, a timestep weighting and a prediction type.

The scale decides what "an outlier" means (docs/DESIGN.md, Scale). ``scale="adaptive"`` (the default)
sets, per sample, ``delta_b = R_b / (temperature * m_k(t_b))`` where ``m_k`` is a running robust
estimate of the penalty R of a typical sample at noise level bucket ``k``: an exponential moving
average of the batch median of R per timestep bucket, kept in buffers (so it is saved in
``state_dict``) and averaged across data-parallel ranks when ``torch.distributed`` is initialised.
An outlier is then "``temperature`` times worse than a typical sample at this noise level", whatever
the data dimension, dataset or schedule; the median tolerates up to 50% contamination per bucket.
The estimate used for a batch is the one from the batches before it (the update follows the loss),
so a step's gradient never depends on its own outliers' penalties through the scale.

The running state is fault tolerant (README "Failure behaviour"): a batch with a non-finite penalty (an fp16
forward pass that overflowed, a NaN in the data) or whose bucket medians are all below 1e-12 (a zero residual)
never enters it, and is counted in the ``skipped_updates`` buffer; an accepted bucket median is clamped to at
most :data:`MAX_UPDATE_RATIO` (2) times the bucket's current value before the EMA (counted in
``limited_updates``), so one absurd batch moves a bucket by at most ``momentum + (1 - momentum) * 2`` (1.1x at
the default momentum) and the next clean batches bring it back (the excess shrinks by ``momentum`` per batch).
The state stays float32 whatever the module's dtype (``.half()`` leaves it alone), and ``load_state_dict``
refuses a non-finite or non-positive scale.
With ``update="step"`` (what :class:`~robust_diffusion.training.trainer.Trainer` uses) a forward pass only stages its
statistic and :meth:`RobustDiffusionLoss.step` commits it after the optimizer step, or drops it when that step
was skipped (``step(ok=torch.isfinite(grad_norm))``: GradScaler's own test), so a skipped step leaves no trace.

Why adaptive is the default: on contaminated Fashion-MNIST it gave the bounded divergences lower Frechet
distances, fewer contaminant-like samples and influence weights that flag the contaminated samples far better
than a fixed scale or ``"vlb"`` (docs/RESULTS.md has the protocol and the numbers). The normalisation by m_k is
also a timestep weighting, which helped even with every influence weight 1 (``"kl"``), clean data included.
``RobustDiffusionLoss("kl", scale=1.0)`` is ``F.mse_loss``.
"""

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ._buffers import DtypeKeepingModule
from .functional import PENALTY_FLOOR, batch_scale, default_schedule
from .ops import LOSS_TABLE
from .schedules import NoiseSchedule, Schedule, prediction_type_for
from .weighting import loss_weights, pseudo_huber_c

__all__ = ["RobustDiffusionLoss", "BUCKET_LOG_SNR_RANGE", "LOSSES", "MAX_UPDATE_RATIO", "PENALTY_FLOOR"]

#: Every loss the module accepts.
LOSSES = tuple(entry.name for entry in LOSS_TABLE)
#: The adaptive scale takes an accepted bucket median only up to this factor times the bucket's current value.
MAX_UPDATE_RATIO = 2.0
#: Continuous schedules: the adaptive buckets split this log-SNR range into equal parts, from the least noisy
#: (bucket 0, everything above 10) to the noisiest (everything below -10). It covers the training noise levels of
#: the usual processes (flow matching with logit-normal times: about [-4, 4]; SD3's shift 3: 2.2 lower; EDM's
#: log-normal sigma: about [-2.4, 7.2]; DDPM's linear schedule: [-10.1, 9.2]).
BUCKET_LOG_SNR_RANGE = (-10.0, 10.0)
# PENALTY_FLOOR (functional.py): bucket medians below it carry no scale information and are not taken in; the
# state never goes below it.
_UPDATE_MODES = ("forward", "step")


class RobustDiffusionLoss(DtypeKeepingModule):
    """A robust denoising loss for a diffusion training step.

    Every loss is ``weight_b * phi(scale_b * R_b)`` (docs/DESIGN.md, Losses). For the losses without a per-sample
    transform (``phi`` the identity: ``kl``, ``huber``, ``pseudo_huber``, ``clipped_mse`` with ``mode="element"``)
    the scale only multiplies the loss, so the default ``scale="adaptive"`` makes them a per-noise-level
    normalisation of the loss, ``R_b / (temperature * m_k(t_b))`` (e.g. the MSE divided by tau times the running
    median penalty of the sample's noise level), not the plain loss. Pass ``scale=1.0`` for the plain MSE or
    diffusers' pseudo-Huber loss.

    Data parallel: when ``torch.distributed`` is initialised, each bucket's median is averaged over the ranks of
    the default process group that saw the bucket (one all-reduce per update), so every rank keeps the same
    adaptive state. A TorchScript-ed module skips that all-reduce (TorchScript cannot call
    ``torch.distributed``): each rank then keeps its own running scale.

    Args:
        loss: one of :data:`LOSSES` (an f-divergence of ``DIVERGENCES`` or a baseline).
        schedule: the :class:`~robust_diffusion.Schedule` the timesteps refer to (default: linear
            :class:`NoiseSchedule`, T = 1000): a discrete one takes integer steps ``t``, a continuous one
            (:class:`~robust_diffusion.FlowMatchingSchedule`, EDM, continuous VP / VE) its float times (EDM:
            sigma). On a continuous schedule the weights and pseudo-Huber ``c`` are evaluated at
            ``schedule.log_snr(t)`` on each call, ``scale="vlb"`` (DDPM's lambda_t) and ``normalize_weights`` are
            refused, and TorchScript is not supported (``torch.compile`` and ``torch.export`` are).
        scale: ``"adaptive"`` (default, for the evidence in the module docstring), ``"vlb"`` (DDPM's
            lambda_t, converted to the prediction type's error), ``"batch"`` (stateless: the median penalty of
            the batch's samples nearest in noise level, :func:`robust_diffusion.batch_scale`) or a float (a fixed
            t-independent scale of R_b).
            For ``kl``, ``huber``, ``pseudo_huber`` and ``clipped_mse`` with ``mode="element"``, ``"adaptive"``
            divides the loss by ``temperature`` times the running median penalty of the sample's noise level
            (a per-noise-level normalisation, not the plain loss): use ``scale=1.0`` for plain MSE or
            diffusers' pseudo-Huber.
        temperature: the adaptive scale's tau: a sample whose penalty is ``temperature`` times the typical
            one at its noise level gets delta = 1. Default 1, by the decision rule written in docs/RESULTS.md
            before its runs; 0.25 is worth trying with Hellinger.
        num_buckets: noise-level buckets of the adaptive scale: equal ranges of t on a discrete schedule (as
            before continuous time; equal shares of uniformly drawn steps), equal ranges of log-SNR over
            :data:`BUCKET_LOG_SNR_RANGE` on a continuous one (one bucket is one noise level whatever the
            process and the timestep sampler).
        momentum: EMA momentum of the per-bucket medians.
        weighting: a timestep weighting scheme of :func:`robust_diffusion.loss_weights` (default constant),
            with ``weighting_params`` and ``terminal`` passed on. With a fixed or adaptive scale the weights
            are converted to ``prediction_type`` (``w_x0 MSE_x0 == w_eps MSE_eps``). With ``scale="vlb"`` the
            scale already turns the error of any prediction type into the same mismatch delta (DDPM's
            lambda_t times the epsilon error), so the epsilon-space weights apply: one model error gives one
            loss whatever the prediction type.
        normalize_weights: divide the timestep weights by their mean over all T steps (``loss_weights``'
            ``normalize``), so their average under uniform timestep sampling is 1.
        prediction_type: what the model predicts (``epsilon``, ``sample``, ``v_prediction``; ``flow_prediction``
            on a flow-matching schedule); default the schedule's.
        dim_reduction: ``"mean"`` (default) or ``"sum"`` of the penalty over a sample's elements.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        normalize_influence: divide the loss by the batch mean influence weight (detached), which keeps
            the effective learning rate when most weights fall below 1.
        update: when a training batch's statistic enters the adaptive state: ``"forward"`` (default) at the
            end of the forward pass; ``"step"``: the forward pass stages it and :meth:`step`, called after the
            optimizer step, commits it (the statistics of several forward passes, as in gradient accumulation,
            are averaged), or drops it when told the step was skipped.
        **loss_params: ``alpha`` (alpha), ``delta`` (huber), ``c``, ``c_schedule``, ``c_scale``, ``form`` (pseudo_huber),
            ``tau``, ``mode`` (clipped_mse).

    After each call, ``last_influence`` and ``last_penalty`` hold the batch's per-sample influence weights
    and penalties R_b (detached), for logging. The buffers ``skipped_updates`` (batch statistics the adaptive
    state refused: non-finite, zero, or from a step reported as skipped) and ``limited_updates`` (bucket updates
    clamped to :data:`MAX_UPDATE_RATIO` times the bucket) count faults; the Trainer logs them.

    ``t`` is checked on every call: integer dtype, one per sample, on the input's device, in ``[0, T)`` (on
    the CPU at once; on an accelerator and under torch.compile by an asynchronous device assertion, no sync).
    On a continuous schedule: floating dtype, one per sample, on the input's device, in the schedule's range
    (checked by ``schedule.check_timesteps`` on the CPU).
    """

    last_influence: Optional[Tensor]
    last_penalty: Optional[Tensor]
    staged_statistic: Optional[Tensor]

    def __init__(self, loss: str = "hellinger", schedule: Optional[NoiseSchedule] = None, *,
                 scale: Union[str, float] = "adaptive", temperature: float = 1.0, num_buckets: int = 10,
                 momentum: float = 0.9, weighting: str = "constant", weighting_params: Optional[Dict[str, float]] = None,
                 terminal: str = "clamp", normalize_weights: bool = False, prediction_type: Optional[str] = None,
                 dim_reduction: str = "mean", reduction: str = "mean", normalize_influence: bool = False,
                 update: str = "forward", **loss_params):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        params = dict(LOSS_TABLE[LOSSES.index(loss)].defaults)
        unknown = sorted(set(loss_params) - set(params))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for loss {loss!r}; it takes {sorted(params) or 'none'}")
        params.update(loss_params)
        if isinstance(scale, str) and scale not in ("adaptive", "vlb", "batch"):
            raise ValueError(f"scale must be 'adaptive', 'vlb', 'batch' or a non-negative float, got {scale!r}")
        if not isinstance(scale, str) and not float(scale) >= 0:
            raise ValueError(f"scale must be 'adaptive', 'vlb', 'batch' or a non-negative float, got {scale!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not (isinstance(num_buckets, int) and num_buckets >= 1):
            raise ValueError(f"num_buckets must be a positive integer, got {num_buckets!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if dim_reduction not in ("mean", "sum"):
            raise ValueError(f"dim_reduction must be 'sum' or 'mean', got {dim_reduction!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if update not in _UPDATE_MODES:
            raise ValueError(f"update must be one of {_UPDATE_MODES}, got {update!r}")

        schedule = schedule or default_schedule()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"RobustDiffusionLoss: schedule must be a Schedule (NoiseSchedule, FlowMatchingSchedule, "
                            f"EDMSchedule, ...), got {type(schedule).__name__}")
        self.discrete = bool(schedule.discrete)
        if not self.discrete:
            if scale == "vlb":
                raise ValueError(f"RobustDiffusionLoss: scale='vlb' is DDPM's lambda_t of a discrete schedule; "
                                 f"{schedule!r} is continuous (use 'adaptive', 'batch' or a number)")
            if normalize_weights:
                raise ValueError("RobustDiffusionLoss: normalize_weights=True averages over the T steps of a "
                                 "discrete schedule; a continuous schedule has none")
        kind = prediction_type_for(schedule, prediction_type, "RobustDiffusionLoss")
        self.loss = loss
        self.scale_mode = scale if isinstance(scale, str) else "fixed"
        self.fixed_scale = 0.0 if isinstance(scale, str) else float(scale)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.num_timesteps = schedule.num_timesteps if self.discrete else 0
        self.num_buckets = min(num_buckets, schedule.num_timesteps) if self.discrete else num_buckets
        self.prediction_type = kind
        self.dim_reduction = dim_reduction
        self.reduction = reduction
        self.normalize_influence = normalize_influence
        self.update = update
        self.max_update_ratio = MAX_UPDATE_RATIO  # attributes, so TorchScript sees them
        self.penalty_floor = PENALTY_FLOOR
        self.alpha = float(params.get("alpha", 0.25))
        self.delta = float(params.get("delta", 1.0))
        self.form = str(params.get("form", "huber"))
        self.tau = float(params.get("tau", 1.0))
        self.mode = str(params.get("mode", "sample"))
        self.uses_weighting = weighting != "constant"
        self.last_influence = None
        self.last_penalty = None

        # Discrete: per-timestep constants, as float32 buffers indexed by t (no host round-trip per step). The
        # weights come through loss_weights, which saturates at the float32 range (never inf). Continuous: the same
        # functions at each call's t (_continuous_terms); the buffers stay empty.
        weight_kind = "epsilon" if self.scale_mode == "vlb" else kind  # vlb_scale converts the error itself
        self._schedule = schedule
        self._weight_args = (weighting, weight_kind, terminal, dict(weighting_params or {}))
        self._huber_args = (params["c"], params["c_schedule"], params["c_scale"]) if loss == "pseudo_huber" else None
        empty = torch.zeros(0)
        if self.discrete:
            steps = torch.arange(schedule.num_timesteps)
            weights = loss_weights(schedule, steps, weighting, weight_kind, terminal=terminal,
                                   normalize=normalize_weights, **(weighting_params or {}))
            c_b = (pseudo_huber_c(schedule, steps, *self._huber_args) if self._huber_args is not None
                   else torch.ones(schedule.num_timesteps))
        else:  # check the settings now, not at the first call
            probe = schedule.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
            weights, c_b = empty, empty
            loss_weights(schedule, probe, weighting, weight_kind, terminal=terminal, **(weighting_params or {}))
            if self._huber_args is not None:
                pseudo_huber_c(schedule, probe, *self._huber_args)
        self.register_buffer("timestep_weight", weights, persistent=False)
        self.register_buffer("vlb_scale", _vlb_scale(schedule, kind) if self.discrete else empty, persistent=False)
        self.register_buffer("huber_c", c_b.float(), persistent=False)
        # Adaptive state: the running median penalty per bucket, whether it has been seeded, and fault counters.
        self.register_buffer("bucket_penalty", torch.ones(self.num_buckets))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("limited_updates", torch.zeros((), dtype=torch.int64))
        # update="step": the sum of the batch statistics staged since the last step() (bucket_statistic's layout:
        # per bucket the sum of medians and their count, then the refused batches). Not saved (a resumed run
        # redoes the step).
        self.staged_statistic = None
        self._seeded = False  # host mirror of `initialized`, so no step syncs to read it (_follow_initialized)
        self._seeded_probe = None  # (pinned copy of `initialized`, its CUDA event), in flight

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: a continuous schedule is Python code TorchScript cannot compile."""
        if not self.discrete:
            raise TypeError(f"RobustDiffusionLoss: TorchScript supports discrete schedules only, this module's is "
                            f"{self._schedule!r} (use torch.compile or torch.export)")
        return self

    def extra_repr(self) -> str:
        scale = self.scale_mode if self.scale_mode != "fixed" else self.fixed_scale
        return (f"loss={self.loss!r}, scale={scale!r}, temperature={self.temperature}, "
                f"prediction_type={self.prediction_type!r}, buckets={self.num_buckets}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for counter in ("skipped_updates", "limited_updates"):  # checkpoints written before the counters
            state_dict.setdefault(prefix + counter, torch.zeros((), dtype=torch.int64))
        penalty = state_dict.get(prefix + "bucket_penalty")
        if isinstance(penalty, Tensor) and not bool((torch.isfinite(penalty) & (penalty >= PENALTY_FLOOR)).all()):
            raise ValueError(f"RobustDiffusionLoss.load_state_dict: {prefix}bucket_penalty must be finite and at "
                             f"least {PENALTY_FLOOR:g}, got {penalty.tolist()} (a corrupted checkpoint?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._seeded = bool(self.initialized)
        self._seeded_probe = None

    def buckets(self, t: Tensor) -> Tensor:
        """The adaptive-scale bucket of each timestep: equal ranges of t (discrete), of log-SNR (continuous)."""
        if self.discrete:
            return torch.div(t * self.num_buckets, self.num_timesteps, rounding_mode="floor")
        return self._log_snr_buckets(t)

    @torch.jit.unused
    def _log_snr_buckets(self, t: Tensor) -> Tensor:
        return log_snr_buckets(self._schedule.log_snr(t), self.num_buckets)

    @torch.jit.unused
    def _continuous_terms(self, t: Tensor, dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Continuous schedules: the timestep weights (None when constant; float64 for float64 inputs) and
        pseudo-Huber c (None for the other losses) of this call's t."""
        scheme, kind, terminal, params = self._weight_args
        weights = (loss_weights(self._schedule, t, scheme, kind, terminal=terminal,
                                dtype=torch.float64 if dtype == torch.float64 else torch.float32, **params)
                   if self.uses_weighting else None)
        c = pseudo_huber_c(self._schedule, t, *self._huber_args) if self._huber_args is not None else None
        return weights, c

    def forward(self, input: Tensor, target: Tensor, t: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """The loss of a batch: ``input`` the model output, ``target`` what it should predict (both
        [B, ...] in ``prediction_type`` space), ``t`` integer timesteps [B], ``weight`` an optional
        extra per-sample weight [B]."""
        self._check_call(input, t)
        if self.discrete:
            timestep_weight = self.timestep_weight[t] if self.uses_weighting else None
            c = self.huber_c[t] if self.loss == "pseudo_huber" else None
        else:
            timestep_weight, c = self._continuous_terms(t, input.dtype)
        sample_weight = weight
        if timestep_weight is not None:
            sample_weight = timestep_weight if weight is None else timestep_weight * weight
        bucket = self.buckets(t)
        if self.scale_mode == "adaptive":
            typical = self.bucket_penalty
            if not self._seeded and not torch.jit.is_scripting():
                self._read_seeded_probe()
            if not self._seeded:
                typical = self._provisional_penalty(input, target, bucket, c)
            scale = 1.0 / (self.temperature * typical[bucket])
        elif self.scale_mode == "vlb":
            scale = self.vlb_scale[t]
        elif self.scale_mode == "batch":
            with torch.no_grad():  # stateless: this batch's penalties at scale 1, their medians by noise level
                penalty = self._call(input.detach(), target.detach(), _ones(t), None, c, "none")[1]
            scale = batch_scale(penalty, t, self.temperature)
        else:
            scale = torch.full(t.shape, self.fixed_scale, dtype=torch.float32, device=t.device)
        loss, penalty, influence = self._call(input, target, scale, sample_weight, c, self.reduction)
        if self.scale_mode == "adaptive" and self.training:
            statistic = self._statistic(penalty.detach(), bucket)
            if self.update == "forward":
                self._take_in(statistic, None)
                self._follow_initialized()
            else:
                staged = self.staged_statistic
                self.staged_statistic = statistic if staged is None else staged + statistic
        self.last_influence = influence.detach()
        self.last_penalty = penalty.detach()
        if self.normalize_influence:
            loss = loss / influence.detach().mean().clamp_min(1e-12)
        return loss

    @torch.jit.export
    def step(self, ok: Optional[Tensor] = None) -> None:
        """``update="step"``: commit the statistics staged by the forward passes since the last call, or, when
        ``ok`` (a bool, or a one-element bool tensor such as ``torch.isfinite(grad_norm)``) is False, drop them and
        count the step as skipped. Call it after the optimizer step; with a GradScaler, pass the same test the
        scaler uses (any non-finite gradient) so a step it skips leaves no trace. No host sync. Does nothing with
        ``update="forward"``."""
        if not torch.jit.is_scripting():
            ok = self._step_flag(ok)
        staged = self.staged_statistic
        if self.update != "step" or staged is None:
            return
        if ok is not None:
            ok = ok.to(self.bucket_penalty.device)
        self._take_in(staged, ok)
        self.staged_statistic = None
        self._follow_initialized()

    @torch.jit.unused
    def _step_flag(self, ok: Optional[Tensor]) -> Optional[Tensor]:
        """``step``'s ``ok`` as a bool tensor; a float (say, the gradient norm itself, where its finiteness was
        meant) is refused rather than read as true."""
        if ok is None or isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.numel() == 1:
            return ok
        if isinstance(ok, bool):
            return torch.tensor(ok)
        if isinstance(ok, Tensor):
            raise ValueError(f"RobustDiffusionLoss.step: ok must be a bool or a one-element bool tensor (e.g. "
                             f"torch.isfinite(grad_norm)), got a {ok.dtype} tensor of shape {tuple(ok.shape)}")
        raise TypeError(f"RobustDiffusionLoss.step: ok must be a bool or a one-element bool tensor (e.g. "
                        f"torch.isfinite(grad_norm)), got {type(ok).__name__}")

    def _check_call(self, input: Tensor, t: Tensor) -> None:
        """The checks of t and of the module's device, with messages that name them (no host sync off the CPU)."""
        if not self.discrete:
            if not t.is_floating_point():
                raise TypeError(f"RobustDiffusionLoss: t must hold the continuous schedule's float times, got dtype "
                                f"{t.dtype}")
        elif t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"RobustDiffusionLoss: t must hold integer timesteps (int32/int64), got dtype {t.dtype}")
        if input.dim() < 1 or t.dim() != 1 or t.shape[0] != input.shape[0]:
            raise ValueError(f"RobustDiffusionLoss: t must be a 1-D tensor with one timestep per sample of input "
                             f"(shape {list(input.shape)}), got shape {list(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"RobustDiffusionLoss: t must be on input's device ({input.device}), got {t.device}")
        if self.bucket_penalty.device != input.device:
            raise ValueError(f"RobustDiffusionLoss: the module is on {self.bucket_penalty.device} and input on "
                             f"{input.device}: move the module with .to('{input.device}')")
        if not self.discrete:
            self._check_continuous_times(t)
            return
        steps = self.num_timesteps
        if torch.jit.is_scripting():
            torch._assert_async(((t >= 0) & (t < steps)).all(), f"RobustDiffusionLoss: t must lie in [0, {steps})")
        else:
            _check_timestep_range(t, steps)

    @torch.jit.unused
    def _check_continuous_times(self, t: Tensor) -> None:
        self._schedule.check_timesteps(t, caller="RobustDiffusionLoss")

    def _call(self, input: Tensor, target: Tensor, scale: Tensor, weight: Optional[Tensor], c: Optional[Tensor],
              reduction: str):
        # One explicit branch per operator: TorchScript cannot look an operator up by a name held in a string.
        ops = torch.ops.robust_diffusion
        dr = self.dim_reduction
        if self.loss == "kl":
            return ops.kl_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "hellinger":
            return ops.hellinger_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "ned":
            return ops.ned_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "alpha":
            return ops.alpha_loss(input, target, scale, weight, dr, reduction, self.alpha)
        if self.loss == "js":
            return ops.js_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "lecam":
            return ops.lecam_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "tv":
            return ops.tv_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "chi2":
            return ops.chi2_loss(input, target, scale, weight, dr, reduction)
        if self.loss == "huber":
            return ops.huber_loss(input, target, scale, weight, dr, reduction, self.delta)
        if self.loss == "pseudo_huber":
            assert c is not None  # forward passes pseudo-Huber's c
            return ops.pseudo_huber_loss(input, target, scale, weight, dr, reduction, c, self.form)
        return ops.clipped_mse_loss(input, target, scale, weight, dr, reduction, self.tau, self.mode)

    def _provisional_penalty(self, input: Tensor, target: Tensor, bucket: Tensor, c: Optional[Tensor]) -> Tensor:
        """Before the first training batch has been taken in: the state where it is initialised (loaded into a
        TorchScript module, where ``_load_from_state_dict`` does not run and so cannot set the host flag), else
        what this batch's own statistic would seed it to (its bucket medians; the median over buckets where a
        bucket has none), at the cost of one extra pass over the batch. Changes no state."""
        with torch.no_grad():
            penalty = self._call(input.detach(), target.detach(), _ones(bucket), None, c, "none")[1]
            seeded = self.bucket_penalty.clone()
            counter = torch.zeros((), dtype=torch.int64, device=seeded.device)
            torch.ops.robust_diffusion.adaptive_scale_update(
                seeded, torch.zeros((), dtype=torch.bool, device=seeded.device), counter, counter.clone(),
                self._statistic(penalty, bucket), None, self.momentum, self.max_update_ratio, self.penalty_floor)
            return torch.where(self.initialized, self.bucket_penalty, seeded)

    def _follow_initialized(self) -> None:
        """After an update attempt: the host flag follows ``initialized`` without a host sync. An attempt need not
        seed the state (a refused first statistic, a skipped first step), and until it is seeded each batch is
        scored against its own medians. On the CPU the flag is read at once; on a GPU through a non-blocking copy
        that a later forward reads once it has landed (until then it takes the provisional path, which is right
        either way). Compiled and scripted code cannot read a tensor on the host: there the flag is set by the
        first attempt, so a batch after a refused first one is scored at the initial scale of 1."""
        if self._seeded:
            return
        if torch.jit.is_scripting():
            self._seeded = True
        else:
            self._probe_initialized()

    @torch.jit.unused
    def _probe_initialized(self) -> None:
        flag = self.initialized
        if torch.compiler.is_compiling() or flag.device.type == "meta":
            self._seeded = True
        elif flag.device.type == "cpu":
            self._seeded = bool(flag)
        elif flag.device.type == "cuda":
            landing = torch.empty((), dtype=torch.bool, pin_memory=True)
            landing.copy_(flag, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
            self._seeded_probe = (landing, landed)
        else:  # another accelerator: one read per attempt until seeded
            self._seeded = bool(flag)

    @torch.jit.unused
    def _read_seeded_probe(self) -> None:
        probe = self._seeded_probe
        if probe is not None and not torch.compiler.is_compiling() and probe[1].query():
            self._seeded = bool(probe[0])
            self._seeded_probe = None

    def _take_in(self, statistic: Tensor, ok: Optional[Tensor]) -> None:
        """Move the state towards a batch statistic, in place (docs/DESIGN.md, Scale; csrc/math/adaptive_scale.h):
        the first statistic seeds every bucket (those it lacks with its median over buckets); later ones are
        clamped to at most MAX_UPDATE_RATIO times the bucket's value, then averaged in with the EMA. ``ok`` False
        drops the statistic and counts the step as skipped."""
        torch.ops.robust_diffusion.adaptive_scale_update(
            self.bucket_penalty, self.initialized, self.skipped_updates, self.limited_updates, statistic, ok,
            self.momentum, self.max_update_ratio, self.penalty_floor)

    def _statistic(self, penalty: Tensor, bucket: Tensor) -> Tensor:
        """This batch's statistic (``bucket_statistic``): per bucket its median penalty with count 1, or nothing
        (no sample, a median below PENALTY_FLOOR: no scale information); a batch with a non-finite penalty (a
        forward pass that overflowed, NaN data: GradScaler will skip that step) or with no bucket left is refused
        whole and counted. Averaged over data-parallel ranks."""
        statistic = torch.ops.robust_diffusion.bucket_statistic(penalty, bucket, self.num_buckets, self.penalty_floor)
        if not torch.jit.is_scripting():
            statistic = _average_over_ranks(statistic)
        return statistic


def _ones(t: Tensor) -> Tensor:
    """A scale of 1 per sample (float32, on t's device)."""
    return torch.ones(t.shape, dtype=torch.float32, device=t.device)


def log_snr_buckets(log_snr: Tensor, num_buckets: int) -> Tensor:
    """The noise-level bucket of each log-SNR on a continuous schedule: ``num_buckets`` equal ranges of
    :data:`BUCKET_LOG_SNR_RANGE`, 0 the least noisy, the end buckets open (+-inf included). int64."""
    low, high = BUCKET_LOG_SNR_RANGE
    position = (high - log_snr) * (num_buckets / (high - low))
    return torch.floor(position).clamp(0, num_buckets - 1).long()


def _check_timestep_range(t: Tensor, steps: int) -> None:
    """t in [0, steps): a ValueError with the values on the CPU in eager mode; an asynchronous device assertion
    elsewhere (an accelerator, where reading them would sync; torch.compile, where it would break the graph)."""
    expected = f"RobustDiffusionLoss: t must lie in [0, {steps}) (the step indices of the module's schedule)"
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= steps:
            raise ValueError(f"{expected}, got values in [{low}, {high}]")
    elif t.device.type != "meta":
        torch._assert_async(((t >= 0) & (t < steps)).all(), expected)


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


def _vlb_scale(schedule: NoiseSchedule, prediction_type: str) -> Tensor:
    """DDPM's lambda_t per step, converted to the prediction type's error: the epsilon error is the x0
    error times SNR, and the v error times SNR / (SNR + 1). Infinite log-SNR is clamped to the
    schedule's finite range so every entry is finite."""
    lam = schedule.log_snr()
    finite = torch.isfinite(lam)
    lam = lam.clamp(lam[finite].min().item(), lam[finite].max().item()) if finite.any() else lam.nan_to_num()
    factor = {"epsilon": torch.ones_like(lam), "sample": lam.exp(), "v_prediction": torch.sigmoid(lam)}[prediction_type]
    return (schedule.vlb_weight * factor).float()
