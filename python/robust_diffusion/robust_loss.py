"""RobustDiffusionLoss: one module that composes a loss, its scale and a timestep weighting.

- the loss: one of :data:`LOSSES`, a fused operator (docs/DESIGN.md, Losses);
- the scale: what counts as an outlier (docs/DESIGN.md, Scale). The default ``"adaptive"`` divides each sample's
  penalty by ``temperature`` times the running typical penalty at its noise level, kept by the submodule
  :class:`~robust_diffusion.adaptive_scale.AdaptiveScale`; ``"vlb"``, ``"batch"`` and a number need no state;
- the weighting: a timestep weighting of :func:`~robust_diffusion.loss_weights`, converted to the prediction type.

Why adaptive is the default: on contaminated Fashion-MNIST it gave the bounded divergences better models and
influence weights that flag the contaminated samples far better than a fixed scale or ``"vlb"`` (docs/RESULTS.md).
The normalisation by the typical penalty is also a timestep weighting, and it applies to every loss, KL included:
``RobustDiffusionLoss("kl", scale=1.0)`` is ``F.mse_loss``, ``RobustDiffusionLoss("kl")`` is not. What bad batches
do to the running state: docs/DESIGN.md, Failure behaviour.
"""

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ._buffers import DtypeKeepingModule
from .continuous import as_schedule
from .adaptive_scale import BUCKET_LOG_SNR_RANGE, MAX_UPDATE_RATIO, PENALTY_FLOOR, AdaptiveScale, log_snr_buckets
from .functional import batch_scale, check_tensor, default_schedule
from .ops import LOSS_TABLE
from .schedules import NoiseSchedule, Schedule, prediction_type_for
from .weighting import loss_weights, pseudo_huber_c

__all__ = ["RobustDiffusionLoss", "BUCKET_LOG_SNR_RANGE", "LOSSES", "MAX_UPDATE_RATIO", "PENALTY_FLOOR"]

#: Every loss the module accepts.
LOSSES = tuple(entry.name for entry in LOSS_TABLE)
SCALES = ("adaptive", "vlb", "batch")


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
            :class:`NoiseSchedule`, T = 1000), or a diffusers scheduler as it is (``DDPMScheduler`` and its family,
            ``FlowMatchEulerDiscreteScheduler``, the EDM schedulers; :func:`~robust_diffusion.schedule_from_diffusers`
            maps it): a discrete one takes integer steps ``t``, a continuous one
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
        num_buckets: noise-level buckets of the adaptive scale: equal ranges of t on a discrete schedule (equal
            shares of uniformly drawn steps), equal ranges of log-SNR over
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
            the effective learning rate when most weights fall below 1 (docs/DESIGN.md, Scale: what it does
            under gradient clipping; docs/RESULTS.md, "Influence normalisation rule": why it is off by default).
        update: when a training batch's statistic enters the adaptive state: ``"forward"`` (default) at the
            end of the forward pass; ``"step"``: the forward pass stages it and :meth:`step`, called after the
            optimizer step, commits it (the statistics of several forward passes, as in gradient accumulation,
            are averaged), or drops it when told the step was skipped.
        **loss_params: ``alpha`` (alpha), ``delta`` (huber), ``c``, ``c_schedule``, ``c_scale``, ``form`` (pseudo_huber),
            ``tau``, ``mode`` (clipped_mse).

    After each call, ``last_influence`` and ``last_penalty`` hold the batch's per-sample influence weights
    and penalties R_b (detached), for logging. ``last_influence`` is relative to a typical sample: the weight
    w_b = phi'(delta_b) divided by :attr:`typical_influence`, the weight of a sample whose penalty is the typical
    (median) one at its noise level, so with the adaptive or batch scale a typical sample reads 1, an outlier
    near 0 and a sample easier than typical above 1 (up to ``1 / typical_influence``). With a fixed or ``vlb``
    scale nothing defines a typical sample: ``typical_influence`` is 1 and the weights are phi'(delta_b) as they
    are (``rd.influence_weights`` gives those too). The adaptive state is the submodule ``adaptive_scale`` (an
    :class:`~robust_diffusion.adaptive_scale.AdaptiveScale`): its buffers ``bucket_penalty``, ``initialized``,
    ``skipped_updates`` (batch statistics refused: non-finite, zero, or from a step reported as skipped) and
    ``limited_updates`` (bucket updates clamped to :data:`MAX_UPDATE_RATIO` times the bucket) are saved in
    ``state_dict`` under ``adaptive_scale.``; the Trainer logs the two counters.

    ``t`` is checked on every call: integer dtype, one per sample, on the input's device, in ``[0, T)`` (on
    the CPU at once; on an accelerator and under torch.compile by an asynchronous device assertion, no sync).
    On a continuous schedule: floating dtype, one per sample, on the input's device, in the schedule's range
    (checked by ``schedule.check_timesteps`` on the CPU).
    """

    last_influence: Optional[Tensor]
    typical_influence: float
    last_penalty: Optional[Tensor]

    def __init__(self, loss: str = "hellinger", schedule: Optional[Schedule] = None, *,
                 scale: Union[str, float] = "adaptive", temperature: float = 1.0, num_buckets: int = 10,
                 momentum: float = 0.9, weighting: str = "constant", weighting_params: Optional[Dict[str, float]] = None,
                 terminal: str = "clamp", normalize_weights: bool = False, prediction_type: Optional[str] = None,
                 dim_reduction: str = "mean", reduction: str = "mean", normalize_influence: bool = False,
                 update: str = "forward", **loss_params):
        super().__init__()
        params = _loss_parameters(loss, loss_params)
        schedule = default_schedule() if schedule is None else as_schedule(schedule, "RobustDiffusionLoss")
        _check_settings(schedule, scale, temperature, dim_reduction, reduction, normalize_weights)
        AdaptiveScale.check_settings(num_buckets, momentum, update)
        self.discrete = bool(schedule.discrete)
        self.loss = loss
        self.scale_mode = scale if isinstance(scale, str) else "fixed"
        self.fixed_scale = 0.0 if isinstance(scale, str) else float(scale)
        self.temperature = float(temperature)
        self.num_timesteps = schedule.num_timesteps if self.discrete else 0
        self.num_buckets = min(num_buckets, schedule.num_timesteps) if self.discrete else num_buckets
        self.prediction_type = prediction_type_for(schedule, prediction_type, "RobustDiffusionLoss")
        self.dim_reduction = dim_reduction
        self.reduction = reduction
        self.normalize_influence = normalize_influence
        self.alpha = float(params.get("alpha", 0.25))
        self.delta = float(params.get("delta", 1.0))
        self.form = str(params.get("form", "huber"))
        self.tau = float(params.get("tau", 1.0))
        self.mode = str(params.get("mode", "sample"))
        self.uses_weighting = weighting != "constant"
        self.last_influence = None
        self.last_penalty = None
        self.adaptive_scale = AdaptiveScale(self.num_buckets, momentum, update)
        self.typical_influence = self._weight_of_a_typical_sample()

        # Discrete: the per-step constants as float32 buffers indexed by t (no host round-trip per step; the weights
        # saturate at the float32 range, never inf). Continuous: the same functions at each call's t
        # (_continuous_terms), checked here once so a bad setting fails now, not at the first call.
        weight_kind = "epsilon" if self.scale_mode == "vlb" else self.prediction_type  # vlb converts the error
        self._schedule = schedule
        self._weight_args = (weighting, weight_kind, terminal, dict(weighting_params or {}))
        self._huber_args = (params["c"], params["c_schedule"], params["c_scale"]) if loss == "pseudo_huber" else None
        empty = torch.zeros(0)
        weights, c_b, vlb = empty, empty, empty
        if self.discrete:
            steps = torch.arange(schedule.num_timesteps)
            weights = loss_weights(schedule, steps, weighting, weight_kind, terminal=terminal,
                                   normalize=normalize_weights, **(weighting_params or {}))
            c_b = (pseudo_huber_c(schedule, steps, *self._huber_args) if self._huber_args is not None
                   else torch.ones(schedule.num_timesteps))
            vlb = _vlb_scale(schedule, self.prediction_type)
        else:
            probe = schedule.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
            self._continuous_terms(probe, torch.float32)
        self.register_buffer("timestep_weight", weights, persistent=False)
        self.register_buffer("vlb_scale", vlb, persistent=False)
        self.register_buffer("huber_c", c_b.float(), persistent=False)

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
        [B, ...] in ``prediction_type`` space), ``t`` its timesteps [B] (integer steps on a discrete schedule, float
        times on a continuous one), ``weight`` an optional extra per-sample weight [B]."""
        self._check_call(input, target, t)
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
            unit_penalty = self._unit_scale_penalty(input, target, c) if self.adaptive_scale.needs_provisional() \
                else None
            scale = 1.0 / (self.temperature * self.adaptive_scale.typical(bucket, unit_penalty))
        elif self.scale_mode == "vlb":
            scale = self.vlb_scale[t]
        elif self.scale_mode == "batch":  # stateless: this batch's penalties at scale 1, their medians by noise level
            scale = batch_scale(self._unit_scale_penalty(input, target, c), t, self.temperature)
        else:
            scale = torch.full(t.shape, self.fixed_scale, dtype=torch.float32, device=t.device)
        loss, penalty, influence = self._call(input, target, scale, sample_weight, c, self.reduction)
        if self.scale_mode == "adaptive" and self.training:
            self.adaptive_scale.observe(penalty.detach(), bucket)
        self.last_influence = influence.detach() if self.typical_influence == 1.0 \
            else influence.detach() / self.typical_influence
        self.last_penalty = penalty.detach()
        if self.normalize_influence:
            loss = loss / influence.detach().mean().clamp_min(1e-12)
        return loss

    @torch.jit.export
    def step(self, ok: Optional[Tensor] = None) -> None:
        """``update="step"``: commit the statistics the forward passes staged since the last call, or drop them
        when ``ok`` is False (:meth:`AdaptiveScale.step <robust_diffusion.adaptive_scale.AdaptiveScale.step>`).
        Call it after the optimizer step, with ``torch.isfinite(grad_norm)``; no host sync."""
        self.adaptive_scale.step(ok)

    def _weight_of_a_typical_sample(self) -> float:
        """phi'(1 / temperature): the influence weight of a sample whose penalty is the typical one at its noise
        level (the adaptive and batch scales give it delta = 1 / temperature), or 1 where no sample is typical
        (a fixed or vlb scale), where every weight is 1, or where the typical sample gets no weight at all (a
        clipped MSE that clips below the typical penalty)."""
        if self.scale_mode not in ("adaptive", "batch") or not LOSS_TABLE[LOSSES.index(self.loss)].weighs_samples:
            return 1.0
        one = torch.ones(1, 1, dtype=torch.float64, device="cpu")
        scale = torch.full((1,), 1.0 / self.temperature, dtype=torch.float64, device="cpu")
        with torch.no_grad():  # R = mean(1^2) = 1 for every penalty that weighs samples, so delta = 1 / temperature
            weight = float(self._call(one, torch.zeros_like(one), scale, None, None, "none")[2])
        return weight if math.isfinite(weight) and weight > 0 else 1.0

    def _unit_scale_penalty(self, input: Tensor, target: Tensor, c: Optional[Tensor]) -> Tensor:
        """The batch's penalties R_b at scale 1 (an extra pass, no gradient)."""
        ones = torch.ones(input.shape[:1], dtype=torch.float32, device=input.device)
        with torch.no_grad():
            penalty = self._call(input.detach(), target.detach(), ones, None, c, "none")[1]
        return penalty

    def _check_call(self, input: Tensor, target: Tensor, t: Tensor) -> None:
        """The checks of t and of the module's device, with messages that name them (no host sync off the CPU)."""
        if not torch.jit.is_scripting():
            self._check_tensors(input, target, t)
        if not self.discrete:
            if not t.is_floating_point():
                raise TypeError(f"RobustDiffusionLoss: t must hold the continuous schedule's float times, got dtype "
                                f"{t.dtype}")
        elif t.dtype != torch.int64 and t.dtype != torch.int32:
            raise TypeError(f"RobustDiffusionLoss: t must hold integer timesteps (int32/int64), got dtype {t.dtype}"
                            f" (t.long() converts it)")
        if input.dim() < 1 or t.dim() != 1 or t.shape[0] != input.shape[0]:
            raise ValueError(f"RobustDiffusionLoss: t must be a 1-D tensor with one timestep per sample of input "
                             f"(shape {list(input.shape)}), got shape {list(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"RobustDiffusionLoss: t must be on input's device ({input.device}), got {t.device}")
        state_device = self.adaptive_scale.bucket_penalty.device
        if state_device != input.device:
            raise ValueError(f"RobustDiffusionLoss: the module is on {state_device} and input on "
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
    def _check_tensors(self, input: Tensor, target: Tensor, t: Tensor) -> None:
        for argument, value in (("input", input), ("target", target), ("t", t)):
            check_tensor("RobustDiffusionLoss", argument, value)
        if input.dim() >= 1 and input.shape[0] == 0:
            raise ValueError("RobustDiffusionLoss: input has an empty batch (size(0) == 0); skip the step instead")

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


def _loss_parameters(loss: str, given: Dict[str, object]) -> Dict[str, object]:
    """The loss's own parameters: its defaults (ops.LOSS_TABLE) updated by ``given``; unknown names refused."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    params = dict(LOSS_TABLE[LOSSES.index(loss)].defaults)
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for loss {loss!r}; it takes {sorted(params) or 'none'}")
    params.update(given)
    return params


def _check_settings(schedule: Schedule, scale: Union[str, float], temperature: float, dim_reduction: str,
                    reduction: str, normalize_weights: bool) -> None:
    """The module's settings, each refused with a message that names it (the adaptive state checks its own)."""
    if isinstance(scale, str) and scale not in SCALES or not isinstance(scale, str) and not float(scale) >= 0:
        raise ValueError(f"scale must be 'adaptive', 'vlb', 'batch' or a non-negative float, got {scale!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if dim_reduction not in ("mean", "sum"):
        raise ValueError(f"dim_reduction must be 'sum' or 'mean', got {dim_reduction!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not schedule.discrete and scale == "vlb":
        raise ValueError(f"RobustDiffusionLoss: scale='vlb' is DDPM's lambda_t of a discrete schedule; "
                         f"{schedule!r} is continuous (use 'adaptive', 'batch' or a number)")
    if not schedule.discrete and normalize_weights:
        raise ValueError("RobustDiffusionLoss: normalize_weights=True averages over the T steps of a "
                         "discrete schedule; a continuous schedule has none")


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


def _vlb_scale(schedule: NoiseSchedule, prediction_type: str) -> Tensor:
    """DDPM's lambda_t per step, converted to the prediction type's error: the epsilon error is the x0
    error times SNR, and the v error times SNR / (SNR + 1). Infinite log-SNR is clamped to the
    schedule's finite range so every entry is finite."""
    lam = schedule.log_snr()
    finite = torch.isfinite(lam)
    lam = lam.clamp(lam[finite].min().item(), lam[finite].max().item()) if finite.any() else lam.nan_to_num()
    factor = {"epsilon": torch.ones_like(lam), "sample": lam.exp(), "v_prediction": torch.sigmoid(lam)}[prediction_type]
    return (schedule.vlb_weight * factor).float()
