"""Risk-sensitive diffusion [RISK] (docs/DESIGN.md, Risk): train on samples whose perturbation you know.

Each training sample ``x~ = x0 + r * n`` carries a *risk* ``r >= 0``: the per-element std of its known
perturbation ``n`` (Gaussian or Cauchy), given per element (``risk`` with the sample's shape) or per sample
(``risk`` of shape ``[B]``); ``r = 0`` means clean. With the clean forward process
``x_t = alpha_t x0 + sigma_t eta``, the risk-sensitive process adds only the noise that is still missing::

    x_t = alpha_t x~ + v eta,      v^2 = max(sigma_t^2 - alpha_t^2 c r^2, 0)

so for Gaussian perturbations ``x_t`` has exactly the clean marginal, and the *risk-free* targets below are
unbiased for the clean-data optimum (so a model trained on noisy samples learns the clean distribution)::

    epsilon       (sigma / v) eta             score  -eta / v
    sample (x0)   x~ - alpha c r^2 eta / v    v_prediction  alpha * eps_target - sigma * x0_target  (VP only)

``c = 1`` for Gaussian perturbations and ``c_D = (D + 2) / (D + 5)`` (D = elements per sample) for Cauchy ones,
the optimal coefficient (an exact match is impossible for Cauchy noise). At ``r = 0`` everything is
bit-identical to the standard pipeline (:meth:`NoiseSchedule.q_sample`, target ``eta``). Sampling is unchanged.

The processes (``alpha_t``, ``sigma_t``): every function here takes any
:class:`~robust_diffusion.schedules.Schedule` and uses only that interface, so these and your own work alike:

- :class:`~robust_diffusion.NoiseSchedule` (discrete VP / DDPM, integer ``t``): ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``.
- :class:`~robust_diffusion.ContinuousVPSchedule` (Song et al.'s VP SDE, ``t`` in ``[eps, 1]``): ``beta(t) = beta_min + (beta_max - beta_min) t``.
- :class:`~robust_diffusion.VESchedule` (VE SDE, ``t`` in ``[eps, 1]``): ``alpha = 1``, ``sigma^2 = sigma_t^2 - sigma_min^2`` (the
  transfer variance from ``t = 0``; ``sigma_t = sigma_min (sigma_max / sigma_min)^t``).
- :class:`~robust_diffusion.EDMSchedule` (Karras et al., ``t`` is ``sigma`` itself): ``alpha = 1``, ``sigma``.

**Stability interval.** ``v > 0`` needs ``sigma_t^2 > alpha_t^2 c r^2``, i.e. ``SNR_t c r^2 < 1`` with
``SNR_t = alpha_t^2 / sigma_t^2``, for the largest risk of the sample: ``t > t_min(r)``. With ``margin = m`` in
``[0, 1)`` the samplers require ``v^2 > m sigma_t^2`` instead (``SNR_t c r^2 < 1 - m``), which bounds the target
amplification ``sigma / v`` by ``1 / sqrt(m)``. :func:`sample_timesteps` draws each sample's ``t`` uniformly on its
own interval (EDM: from the log-normal training distribution truncated to it); :func:`timestep_lower_bound` and
:func:`usable_samples` expose the bound. A sample whose interval is empty (risk too large for the schedule) is
never dropped silently: :func:`sample_timesteps` raises, saying how many and the largest risk; filter them first
with :func:`usable_samples` if that is what you want. Likewise :func:`risk_free_loss` raises, saying how many,
for samples noised at a ``t`` outside their interval (``v = 0``: an infinite target). Negative, NaN or infinite
risk is refused everywhere (the bound squares the risk, which would hide its sign).

**The variance weight.** The risk-free targets blow up as ``v -> 0`` at the start of the interval: the
epsilon target has variance ``(sigma / v)^2``. :func:`risk_free_loss` therefore weights each element's squared
error by ``(v / sigma)^2`` by default (``variance_weight=True``), which in epsilon space is
``||(v / sigma) eps_hat - eta||^2``: a residual of unit scale, so the targets' variance stays bounded, gradients
stay finite at the interval's start, and the robust divergences do not mistake a high-risk sample's noisy target
for an outlier. The weight depends only on ``r`` and ``t``, not on ``x0``: when risks are assigned independently
of the clean data, every ``r`` has the same conditional optimum, so the weighted loss has the same minimiser
(it is the same correction factor in every parameterisation). ``variance_weight=False`` is the paper's plain
risk-free loss (then use a ``margin``).

**Gradients.** The noising operator is data preparation: inputs that require grad are refused with an error
rather than given silently wrong (absent) gradients.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (loads the operators)
from .functional import DIVERGENCES, clipped_mse_loss, default_schedule, divergence_loss, huber_loss, pseudo_huber_loss
from .robust_loss import LOSSES, RobustDiffusionLoss
from .continuous import as_schedule
from .schedules import Schedule, canonical_prediction_type
from .weighting import loss_weights

__all__ = [
    "PERTURBATIONS", "RISK_PREDICTION_TYPES", "RiskNoising", "cauchy_variance_factor", "timestep_lower_bound",
    "usable_samples", "sample_timesteps", "risk_noising", "risk_free_loss",
]

PERTURBATIONS = ("gaussian", "cauchy")
#: What a model can be trained to predict on risk-annotated data.
RISK_PREDICTION_TYPES = ("epsilon", "score", "sample", "v_prediction")


# ---------------------------------------------------------------------------------------------- processes


def cauchy_variance_factor(numel_per_sample: int) -> float:
    """``c_D = (D + 2) / (D + 5)``: the optimal factor replacing ``r^2`` for a Cauchy perturbation of scale ``r``."""
    return (numel_per_sample + 2.0) / (numel_per_sample + 5.0)


# ---------------------------------------------------------------------------------------------- stability interval
class _RiskBound(NamedTuple):
    q: Tensor        # c max_j r_j^2 / (1 - margin) per sample, float64: stable iff SNR_t q < 1
    largest: Tensor  # max_j r_j per sample, float64
    c: float         # the perturbation's variance factor
    invalid: Tensor  # int64 scalar: samples with a negative, NaN or infinite risk (the square would hide the sign)


def _host_counts(*counts: Tensor) -> List[int]:
    """The scalar counts a check needs, copied to the host together: one sync per call on an accelerator (a few
    bytes; the messages need the numbers, and a device-side assert would leave a CUDA context unusable)."""
    return torch.stack([c.to(torch.int64) for c in counts]).tolist()


def _raise_invalid_risk(caller: str, risk: Tensor) -> None:
    risk = risk.detach()
    if bool(torch.isnan(risk).any()):
        found = "NaN"
    elif bool((risk < 0).any()):
        found = f"a minimum of {risk.min().item():.6g}"
    else:
        found = "inf"
    raise ValueError(f"{caller}: risk must be non-negative and finite (the std of each sample's known "
                     f"perturbation), got {found}")


def _checked_risk_bound(caller: str, risk: Tensor, perturbation: str, margin: float,
                        numel_per_sample: Optional[int]) -> _RiskBound:
    """:func:`_risk_bound` with its risk check done (one sync per call on an accelerator)."""
    rb = _risk_bound(risk, perturbation, margin, numel_per_sample)
    (invalid,) = _host_counts(rb.invalid)
    if invalid:
        _raise_invalid_risk(caller, risk)
    return rb


def _risk_bound(risk: Tensor, perturbation: str, margin: float, numel_per_sample: Optional[int]) -> _RiskBound:
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"margin must lie in [0, 1) (the smallest allowed (v / sigma)^2), got {margin!r}")
    if not isinstance(risk, Tensor) or risk.dim() < 1 or not risk.dtype.is_floating_point:
        described = f"{risk.dtype} of shape {tuple(risk.shape)}" if isinstance(risk, Tensor) else type(risk).__name__
        raise ValueError(f"risk must be a floating-point tensor [B] or [B, ...], got {described}")
    c = 1.0
    if perturbation == "cauchy":
        if risk.dim() > 1 and numel_per_sample is None:
            numel_per_sample = risk[0].numel()
        if numel_per_sample is None:
            raise ValueError("a per-sample risk [B] with perturbation='cauchy' needs numel_per_sample (the D of c_D)")
        c = cauchy_variance_factor(numel_per_sample)
    flat = risk.detach().double().flatten(1) if risk.dim() > 1 else risk.detach().double()[:, None]
    if flat.shape[1] > 0:
        largest, smallest = flat.amax(dim=1), flat.amin(dim=1)  # both propagate NaN
    else:
        largest = smallest = flat.new_zeros(flat.shape[0])
    invalid = (~((smallest >= 0) & torch.isfinite(largest))).sum()
    return _RiskBound(c * largest.square() / (1.0 - margin), largest, c, invalid)


def timestep_lower_bound(schedule: Schedule, risk: Tensor, *, perturbation: str = "gaussian", margin: float = 0.0,
                         numel_per_sample: Optional[int] = None) -> Tensor:
    """Each sample's ``t_min(r)`` ([B], on ``risk``'s device), from its largest risk.

    - :class:`NoiseSchedule`: the smallest usable integer step (``t >= t_min``; ``T`` when none is), found by
      ``searchsorted`` on the schedule's log-SNR.
    - continuous schedules: the closed-form boundary, float64 (usable ``t > t_min``; for EDM ``t`` is sigma).

    ``risk``: ``[B]`` or ``[B, ...]`` (per element: the sample's maximum counts). ``margin`` in ``[0, 1)``:
    require ``v^2 > margin * sigma_t^2``. ``numel_per_sample``: D for a Cauchy perturbation with a ``[B]`` risk.
    Negative, NaN or infinite risk raises ``ValueError`` (one host sync per call on an accelerator).
    """
    schedule = as_schedule(schedule, "timestep_lower_bound")
    rb = _checked_risk_bound("timestep_lower_bound", risk, perturbation, margin, numel_per_sample)
    return schedule.lower_time_bound(rb.q)


def usable_samples(schedule: Schedule, risk: Tensor, *, perturbation: str = "gaussian", margin: float = 0.0,
                   numel_per_sample: Optional[int] = None) -> Tensor:
    """Boolean ``[B]``: which samples have a non-empty stability interval on ``schedule`` (arguments as in
    :func:`timestep_lower_bound`). Use it to drop unusable samples explicitly before :func:`sample_timesteps`.
    Negative, NaN or infinite risk raises ``ValueError`` (one host sync per call on an accelerator)."""
    schedule = as_schedule(schedule, "usable_samples")
    rb = _checked_risk_bound("usable_samples", risk, perturbation, margin, numel_per_sample)
    return schedule.has_time_after(schedule.lower_time_bound(rb.q))


def sample_timesteps(schedule: Schedule, risk: Tensor, *, perturbation: str = "gaussian", margin: float = 0.0,
                     numel_per_sample: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-sample timesteps drawn on each sample's own stability interval ([B], on ``risk``'s device).

    - :class:`NoiseSchedule`: integers uniform on ``[t_min(r), T)`` (int64); ``r = 0`` gives the usual ``[0, T)``.
    - :class:`ContinuousVPSchedule` / :class:`VESchedule`: float64 uniform on ``(max(t_min(r), eps), 1]``.
    - :class:`EDMSchedule`: sigma (float64) from the log-normal training distribution truncated to ``sigma > t_min(r)``.

    Raises ``ValueError`` naming how many samples have an empty interval and the largest risk (one host sync
    per call; negative, NaN or infinite risk is refused too). Arguments as in :func:`timestep_lower_bound`;
    ``generator`` (on ``risk``'s device) makes the draw reproducible. At ``r = 0`` the draw is
    :meth:`NoiseSchedule.sample_timesteps`'s bit for bit (the same ``floor(u T)`` from the same generator).
    """
    schedule = as_schedule(schedule, "sample_timesteps")
    rb = _risk_bound(risk, perturbation, margin, numel_per_sample)
    bound = schedule.lower_time_bound(rb.q)
    usable = schedule.has_time_after(bound)
    invalid_risk, empty = _host_counts(rb.invalid, (~usable).sum())
    if invalid_risk:
        _raise_invalid_risk("sample_timesteps", risk)
    if empty:
        _raise_empty_intervals(schedule, empty, rb, perturbation, margin)
    return schedule.sample_timesteps_above(bound, generator)


def _raise_empty_intervals(schedule: Schedule, count: int, rb: _RiskBound, perturbation: str, margin: float) -> None:
    smallest_snr = schedule.min_snr()
    largest_q = math.inf if smallest_snr == 0 else 1.0 / smallest_snr
    admissible = math.sqrt(largest_q * (1.0 - margin) / rb.c)
    factor = "" if perturbation == "gaussian" else f" (c = c_D = {rb.c:.6g} for perturbation='cauchy')"
    raise ValueError(
        f"sample_timesteps: risk too large: {count} of {rb.q.numel()} samples have no usable timestep on "
        f"{schedule!r} (largest risk {rb.largest.max().item():.6g}; the stability interval "
        f"SNR_t c r^2 < 1 - margin{factor} is empty for r >= {admissible:.6g} with margin={margin}). Drop them "
        f"explicitly (robust_diffusion.risk.usable_samples), lower the margin, or use a schedule that reaches a "
        f"lower SNR.")


# ---------------------------------------------------------------------------------------------- noising
class RiskNoising(NamedTuple):
    """What :func:`risk_noising` returns."""

    noisy: Tensor        #: x_t, the sample's shape and dtype
    target: Tensor       #: the risk-free target for ``prediction_type``, the sample's shape and dtype
    noise_std: Tensor    #: v, risk's shape ([B] or per element), float32 (float64 for float64 samples)
    clean_std: Tensor    #: sigma_t of the clean process, [B] (v = sigma_t where r = 0)
    prediction_type: str  #: one of RISK_PREDICTION_TYPES


def _canonical_risk_prediction_type(prediction_type: str) -> str:
    return "score" if prediction_type == "score" else canonical_prediction_type(prediction_type)


def risk_noising(sample: Tensor, risk: Union[Tensor, float], t: Tensor, noise: Optional[Tensor] = None, *,
                 schedule: Optional[Schedule] = None, prediction_type: str = "epsilon",
                 perturbation: str = "gaussian", generator: Optional[torch.Generator] = None) -> RiskNoising:
    """Noise risk-annotated samples and compute their risk-free targets (one fused operator,
    ``torch.ops.robust_diffusion.risk_noising``).

    Args:
        sample: the (possibly perturbed) training samples x~ ``[B, ...]``.
        risk: the std of each sample's known perturbation: per element (the sample's shape), per sample ``[B]``,
            or a float for the whole batch. Must be non-negative.
        t: per-sample timesteps ``[B]`` on ``schedule`` (from :func:`sample_timesteps`, so that ``v > 0``).
        noise: eta, the sample's shape and dtype (drawn with ``generator`` if not given).
        schedule: a :class:`NoiseSchedule` (default: linear, T = 1000), :class:`ContinuousVPSchedule`,
            :class:`VESchedule` or :class:`EDMSchedule`.
        prediction_type: ``"epsilon"`` (alias ``eps``), ``"score"``, ``"sample"`` (alias ``x0``) or
            ``"v_prediction"`` (alias ``v``; VP processes only).
        perturbation: ``"gaussian"`` or ``"cauchy"`` (``r`` is then the Cauchy scale and ``c_D`` is applied).

    Returns a :class:`RiskNoising` ``(noisy, target, noise_std, clean_std, prediction_type)``. Not differentiable:
    inputs that require grad are refused.
    """
    schedule = default_schedule() if schedule is None else schedule
    schedule = as_schedule(schedule, "risk_noising")
    kind = _canonical_risk_prediction_type(prediction_type)
    if kind == "v_prediction" and schedule.process != "vp":
        raise ValueError(f"prediction_type 'v_prediction' is defined for VP processes, not {schedule!r}; use "
                         f"'epsilon', 'sample' or 'score'")
    if not isinstance(sample, Tensor) or sample.dim() < 1:
        raise ValueError("sample must be a tensor with a leading batch dimension")
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    if not isinstance(risk, Tensor):
        if isinstance(risk, bool) or not isinstance(risk, (int, float)):
            raise TypeError(f"risk must be a tensor or a float, got {type(risk).__name__}")
        risk = torch.full((sample.shape[0],), float(risk), device=sample.device)
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != sample.shape[0]:
        raise ValueError(f"risk_noising: t must be a 1-D tensor with one timestep per sample ({sample.shape[0]}), "
                         f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    alpha, sigma = schedule.coefficients(t, torch.promote_types(sample.dtype, torch.float32),
                                         caller="risk_noising")
    noisy, target, noise_std = torch.ops.robust_diffusion.risk_noising(sample, risk, noise, alpha, sigma, kind,
                                                                       perturbation)
    return RiskNoising(noisy, target, noise_std, sigma, kind)


def _variance_gain(noising: RiskNoising, like: Tensor) -> Tensor:
    """``v / sigma`` per element (or per sample), shaped to broadcast against ``like``: exactly 1 where r = 0."""
    v = noising.noise_std
    sigma = noising.clean_std.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
    gain = torch.where(v >= sigma, torch.ones_like(v), v / sigma)
    return gain.reshape(gain.shape + (1,) * (like.dim() - gain.dim()))


def _check_inside_stability_intervals(noising: RiskNoising) -> None:
    """Refuse samples noised outside their stability interval: there ``v = 0 < sigma`` and the risk-free target is
    infinite (the variance weight would be 0, which used to drop the sample silently)."""
    v = noising.noise_std
    sigma = noising.clean_std.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
    outside = (v == 0) & (sigma > 0)  # v = sigma exactly where r = 0, so clean samples never count
    outside = outside.flatten(1).any(dim=1) if outside.dim() > 1 else outside
    advice = ("draw t with robust_diffusion.risk.sample_timesteps (each sample on its own interval), or drop the "
              "samples first with robust_diffusion.risk.usable_samples")
    if torch.compiler.is_compiling():  # no host copy inside a graph: an asynchronous assert instead (no count)
        torch._assert_async(~outside.any(), f"risk_free_loss: samples outside their stability interval; {advice}")
        return
    # One host sync per call on an accelerator (a scalar): the message needs the count.
    (count,) = _host_counts(outside.sum())
    if count:
        raise ValueError(
            f"risk_free_loss: {count} of {outside.numel()} samples are outside their stability interval (noise std "
            f"v = 0 at their timestep: the risk is too large for that t, so the risk-free target is infinite); "
            f"{advice}")


_FUNCTIONAL_BASELINES = {"huber": huber_loss, "pseudo_huber": pseudo_huber_loss, "clipped_mse": clipped_mse_loss}


def risk_free_loss(input: Tensor, noising: RiskNoising, t: Optional[Tensor] = None, *,
                   loss: Union[str, RobustDiffusionLoss] = "kl", schedule: Optional[Schedule] = None,
                   variance_weight: bool = True, weighting: str = "constant",
                   weighting_params: Optional[Dict[str, float]] = None, terminal: str = "clamp",
                   weight: Optional[Tensor] = None, scale: Union[float, str, Tensor] = 1.0,
                   dim_reduction: str = "mean", reduction: str = "mean", **loss_params) -> Tensor:
    """The risk-free loss: any robust loss of the library on the risk-free targets of :func:`risk_noising`.

    Args:
        input: the model's prediction at ``noising.noisy``, in ``noising.prediction_type`` space.
        noising: the :func:`risk_noising` result of this batch.
        t: the batch's timesteps (needed for ``weighting``, ``scale="vlb"``, pseudo-Huber ``c_schedule`` and a
            :class:`RobustDiffusionLoss`). Every sample must lie inside its stability interval (``v > 0``):
            samples noised outside it raise ``ValueError`` (one host sync per call on an accelerator) rather than
            being dropped or giving an infinite loss; draw ``t`` with :func:`sample_timesteps`.
        loss: a name of :data:`robust_diffusion.LOSSES` (``"kl"`` = MSE, ``"hellinger"``, ``"ned"``, ...;
            ``**loss_params`` go to it), or a configured :class:`RobustDiffusionLoss` module (adaptive scale,
            weighting and prediction type are then its own).
        schedule: the process of ``t`` (default: linear :class:`NoiseSchedule`).
        variance_weight: weight each element's squared error by ``(v / sigma)^2`` (the module docstring says
            why; default). At ``r = 0`` the weight is exactly 1, so clean data gives the standard loss bit for bit.
        weighting: a timestep weighting scheme of :func:`robust_diffusion.loss_weights` (``weighting_params`` and
            ``terminal`` passed on). For the score parameterisation the epsilon-space weight times ``sigma_t^2``
            is used. Only for a discrete :class:`NoiseSchedule`: :func:`~robust_diffusion.loss_weights` tabulates
            the schemes over its T steps, and continuous processes (:class:`ContinuousVPSchedule`,
            :class:`VESchedule`, :class:`EDMSchedule`) raise ``ValueError``; for them compute the per-sample
            weights yourself (e.g. from ``schedule.log_snr(t)``) and pass them as ``weight``.
        weight: an extra per-sample weight ``[B]``.
        scale, dim_reduction, reduction: as in the functional losses.
    """
    if not isinstance(noising, RiskNoising):
        raise TypeError(f"noising must be the RiskNoising that risk_noising returned, got {type(noising).__name__}")
    target = noising.target
    if not isinstance(input, Tensor) or input.shape != target.shape:
        raise ValueError(f"input must have the target's shape {tuple(target.shape)}, got "
                         f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}")
    _check_inside_stability_intervals(noising)
    if variance_weight:
        gain = _variance_gain(noising, input)
        input = input * gain
        target = target * gain

    if isinstance(loss, nn.Module):
        if not isinstance(loss, RobustDiffusionLoss):
            raise TypeError(f"loss must be a loss name or a RobustDiffusionLoss, got {type(loss).__name__}")
        if weighting != "constant" or loss_params or not (isinstance(scale, (int, float)) and scale == 1.0):
            raise ValueError("with a RobustDiffusionLoss module, configure weighting, scale and loss parameters on "
                             "the module")
        if t is None:
            raise ValueError("a RobustDiffusionLoss needs the timesteps t")
        if loss.prediction_type != noising.prediction_type:
            raise ValueError(f"the RobustDiffusionLoss predicts {loss.prediction_type!r} but the targets are "
                             f"{noising.prediction_type!r}")
        return loss(input, target, t, weight)

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a RobustDiffusionLoss, got {loss!r}")
    schedule = default_schedule() if schedule is None else schedule
    discrete = schedule.discrete
    if weighting != "constant":
        if not discrete:
            raise ValueError(f"risk_free_loss: weighting={weighting!r} needs a discrete NoiseSchedule (loss_weights "
                             f"tabulates the schemes over its steps), not {schedule!r}; for a continuous process "
                             f"compute per-sample weights (e.g. from schedule.log_snr(t)) and pass them as weight=")
        if t is None:
            raise ValueError(f"risk_free_loss: weighting={weighting!r} needs the timesteps t")
        kind = "epsilon" if noising.prediction_type == "score" else noising.prediction_type
        timestep_weight = loss_weights(schedule, t, weighting, kind, terminal=terminal, **(weighting_params or {}))
        if noising.prediction_type == "score":  # MSE_score = MSE_eps / sigma^2
            timestep_weight = timestep_weight * noising.clean_std.to(timestep_weight.dtype).square()
        weight = timestep_weight if weight is None else timestep_weight * weight
    common = dict(schedule=schedule if discrete else None, scale=scale, dim_reduction=dim_reduction, weight=weight,
                  reduction=reduction)
    t_arg = t if discrete else None
    if loss in DIVERGENCES:
        return divergence_loss(loss, input, target, t_arg, **common, **loss_params)
    return _FUNCTIONAL_BASELINES[loss](input, target, t_arg, **common, **loss_params)
