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

The processes (``alpha_t``, ``sigma_t``), all supported by every function here:

- :class:`~robust_diffusion.NoiseSchedule` (discrete VP / DDPM, integer ``t``): ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``.
- :class:`ContinuousVPSchedule` (Song et al.'s VP SDE, ``t`` in ``[eps, 1]``): ``beta(t) = beta_min + (beta_max - beta_min) t``.
- :class:`VESchedule` (VE SDE, ``t`` in ``[eps, 1]``): ``alpha = 1``, ``sigma^2 = sigma_t^2 - sigma_min^2`` (the
  transfer variance from ``t = 0``; ``sigma_t = sigma_min (sigma_max / sigma_min)^t``).
- :class:`EDMSchedule` (Karras et al., ``t`` is ``sigma`` itself): ``alpha = 1``, ``sigma``.

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
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (loads the operators)
from .functional import DIVERGENCES, clipped_mse_loss, default_schedule, divergence_loss, huber_loss, pseudo_huber_loss
from .robust_loss import LOSSES, RobustDiffusionLoss
from .schedules import NoiseSchedule, canonical_prediction_type
from .weighting import loss_weights

__all__ = [
    "PERTURBATIONS", "RISK_PREDICTION_TYPES", "ContinuousVPSchedule", "VESchedule", "EDMSchedule", "RiskNoising",
    "cauchy_variance_factor", "process_coefficients", "timestep_lower_bound", "usable_samples", "sample_timesteps",
    "risk_noising", "risk_free_loss",
]

PERTURBATIONS = ("gaussian", "cauchy")
#: What a model can be trained to predict on risk-annotated data.
RISK_PREDICTION_TYPES = ("epsilon", "score", "sample", "v_prediction")


# ---------------------------------------------------------------------------------------------- processes
class ContinuousVPSchedule:
    """Song et al.'s VP SDE with ``beta(t) = beta_min + (beta_max - beta_min) t`` on ``t`` in ``[eps, 1]``.

    ``abar(t) = exp(-B(t))`` with ``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2``; ``alpha = sqrt(abar)``,
    ``sigma = sqrt(1 - abar)``. The stability bound is closed form: ``SNR(t) = 1 / expm1(B(t)) < 1 / q`` for
    ``q = c r^2 / (1 - margin)`` holds for ``t > t_min = 2L / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) L))``
    with ``L = log1p(q)`` (0.2590 for ``r = 1`` with the defaults).
    """

    process = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5):
        if not (0 <= beta_min <= beta_max and beta_max > 0):
            raise ValueError(f"need 0 <= beta_min <= beta_max and beta_max > 0, got {beta_min!r}, {beta_max!r}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
        self.beta_min, self.beta_max, self.eps = float(beta_min), float(beta_max), float(eps)

    def integrated_beta(self, t: Tensor) -> Tensor:
        t = t.double()
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def log_snr(self, t: Tensor) -> Tensor:
        return -torch.log(torch.expm1(self.integrated_beta(t)))

    def coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        big_b = self.integrated_beta(t)
        return torch.exp(-0.5 * big_b), torch.sqrt(-torch.expm1(-big_b))

    def _boundary(self, q: Tensor) -> Tensor:
        log_q = torch.log1p(q)
        slope = self.beta_max - self.beta_min
        return 2.0 * log_q / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * slope * log_q))

    def _largest_q(self) -> float:
        return math.expm1(self.beta_min + 0.5 * (self.beta_max - self.beta_min))

    def _sample_above(self, lower: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        return _uniform_above(lower.clamp(min=self.eps), generator)

    def _check_t(self, t: Tensor, caller: str) -> None:
        _check_unit_time(t, caller)

    def __repr__(self) -> str:
        return f"ContinuousVPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, eps={self.eps})"


class VESchedule:
    """Song et al.'s VE SDE: ``sigma_t = sigma_min (sigma_max / sigma_min)^t`` on ``t`` in ``[eps, 1]``.

    The clean transfer from ``t = 0`` is ``x_t = x0 + sqrt(sigma_t^2 - sigma_min^2) eta`` (DESIGN's erratum: the
    paper's VE interval misses ``sigma_0^2``), so ``alpha = 1`` and ``sigma^2 = sigma_min^2 expm1(2 t log rho)``,
    ``rho = sigma_max / sigma_min``. Stability (``sigma^2 > q``): ``t > log1p(q / sigma_min^2) / (2 log rho)``.
    """

    process = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
        self.sigma_min, self.sigma_max, self.eps = float(sigma_min), float(sigma_max), float(eps)
        self._log_rho = math.log(self.sigma_max / self.sigma_min)

    def log_snr(self, t: Tensor) -> Tensor:
        return -torch.log(self.coefficients(t)[1].square())

    def coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        return None, self.sigma_min * torch.sqrt(torch.expm1(2.0 * self._log_rho * t.double()))

    def _boundary(self, q: Tensor) -> Tensor:
        return torch.log1p(q / self.sigma_min ** 2) / (2.0 * self._log_rho)

    def _largest_q(self) -> float:
        return self.sigma_max ** 2 - self.sigma_min ** 2

    def _sample_above(self, lower: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        return _uniform_above(lower.clamp(min=self.eps), generator)

    def _check_t(self, t: Tensor, caller: str) -> None:
        _check_unit_time(t, caller)

    def __repr__(self) -> str:
        return f"VESchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, eps={self.eps})"


class EDMSchedule:
    """Karras et al. (EDM): the time variable is the noise level ``sigma`` itself; ``alpha = 1``.

    Training draws ``log sigma ~ N(p_mean, p_std^2)``; :func:`sample_timesteps` draws from that distribution
    truncated to the stability interval ``sigma > sqrt(q)`` (and to ``sigma <= sigma_max`` when given; with
    ``sigma_max=None``, EDM's training default, no risk is too large).
    """

    process = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_max: Optional[float] = None):
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std!r}")
        if sigma_max is not None and not sigma_max > 0:
            raise ValueError(f"sigma_max must be positive or None, got {sigma_max!r}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    def log_snr(self, sigma: Tensor) -> Tensor:
        return -2.0 * torch.log(sigma.double())

    def coefficients(self, sigma: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        return None, sigma.double()

    def _boundary(self, q: Tensor) -> Tensor:
        return torch.sqrt(q)

    def _largest_q(self) -> float:
        return math.inf if self.sigma_max is None else self.sigma_max ** 2

    def _sample_above(self, lower: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        # Inverse CDF in the upper tail: survival S(z) = erfc(z / sqrt 2) / 2 stays accurate far into the tail
        # (torch.special.ndtr(-z) underflows to 0 past z ~ 8).
        def survival(z: Tensor) -> Tensor:
            return 0.5 * torch.special.erfc(z / math.sqrt(2.0))

        z_low = (torch.log(lower) - self.p_mean) / self.p_std  # -inf for lower = 0
        tail_low = survival(z_low)
        tail_high = (torch.zeros_like(tail_low) if self.sigma_max is None
                     else survival(torch.full_like(z_low, (math.log(self.sigma_max) - self.p_mean) / self.p_std)))
        u = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=torch.float64)
        tail = tail_low - (tail_low - tail_high) * (1.0 - u)  # in [tail_high, tail_low): sigma in (lower, sigma_max]
        sigma = torch.exp(self.p_mean - self.p_std * torch.special.ndtri(tail))
        just_above = torch.nextafter(lower, torch.full_like(lower, math.inf))
        # sigma = inf only where the tail underflows (bounds beyond ~1e19): take the bound's neighbour there
        return torch.where(torch.isfinite(sigma), torch.maximum(sigma, just_above), just_above)

    def _check_t(self, sigma: Tensor, caller: str) -> None:
        if not sigma.dtype.is_floating_point:
            raise TypeError(f"{caller}: t must hold floating-point noise levels sigma for EDMSchedule, got dtype "
                            f"{sigma.dtype}")
        if sigma.device.type == "cpu" and sigma.numel() and not bool((sigma > 0).all()):
            raise ValueError(f"{caller}: t must hold positive noise levels sigma for EDMSchedule")

    def __repr__(self) -> str:
        return f"EDMSchedule(p_mean={self.p_mean}, p_std={self.p_std}, sigma_max={self.sigma_max})"


Process = Union[NoiseSchedule, ContinuousVPSchedule, VESchedule, EDMSchedule]
_CONTINUOUS = (ContinuousVPSchedule, VESchedule, EDMSchedule)


def _uniform_above(lower: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Uniform on ``(lower, 1]``: never the (excluded) bound itself."""
    u = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=torch.float64)
    return 1.0 - u * (1.0 - lower)


def _check_unit_time(t: Tensor, caller: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{caller}: t must hold floating-point times in [0, 1] for a continuous schedule, got dtype "
                        f"{t.dtype}")
    if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{caller}: t must lie in [0, 1] for a continuous schedule, got values in "
                         f"[{t.min().item():.4g}, {t.max().item():.4g}]")


def _check_process(schedule: object) -> None:
    if not isinstance(schedule, (NoiseSchedule,) + _CONTINUOUS):
        raise TypeError(f"schedule must be a NoiseSchedule, ContinuousVPSchedule, VESchedule or EDMSchedule, "
                        f"got {type(schedule).__name__}")


def _process_kind(schedule: Process) -> str:
    return "vp" if isinstance(schedule, NoiseSchedule) else schedule.process


def process_coefficients(schedule: Process, t: Tensor, dtype: torch.dtype = torch.float32
                         ) -> Tuple[Optional[Tensor], Tensor]:
    """Per-sample ``(alpha, sigma)`` of the clean process ``x_t = alpha x0 + sigma eta`` at ``t`` ([B] each, on
    ``t``'s device, computed in float64 and cast to ``dtype``); ``alpha`` is ``None`` (= 1) for VE and EDM. For a
    :class:`NoiseSchedule` these are exactly the values :meth:`NoiseSchedule.q_sample` uses."""
    _check_process(schedule)
    return _coefficients(schedule, t, dtype, "process_coefficients")


def _coefficients(schedule: Process, t: Tensor, dtype: torch.dtype, caller: str) -> Tuple[Optional[Tensor], Tensor]:
    """:func:`process_coefficients`, with ``caller`` (the public function) named in the errors about ``t``."""
    if isinstance(schedule, NoiseSchedule):
        return (schedule.gather("sqrt_alphas_cumprod", t, dtype=dtype, caller=caller),
                schedule.gather("sqrt_one_minus_alphas_cumprod", t, dtype=dtype, caller=caller))
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{caller}: t must be a 1-D tensor with one time per sample, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    schedule._check_t(t, caller)
    alpha, sigma = schedule.coefficients(t)
    return (None if alpha is None else alpha.to(dtype)), sigma.to(dtype)


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


_LOG_SNR_CACHE: "weakref.WeakKeyDictionary[NoiseSchedule, Dict[torch.device, Tensor]]" = weakref.WeakKeyDictionary()


def _negative_log_snr(schedule: NoiseSchedule, device: torch.device) -> Tensor:
    tables = _LOG_SNR_CACHE.setdefault(schedule, {})
    if device not in tables:
        tables[device] = (-schedule.log_snr).to(device)  # non-decreasing in t
    return tables[device]


def _lower_bound(schedule: Process, q: Tensor) -> Tensor:
    if isinstance(schedule, NoiseSchedule):
        keys = _negative_log_snr(schedule, q.device)
        # SNR_t q < 1  <=>  -log SNR_t > log q: the first step past every key <= log q. r = 0 fits every step.
        first = torch.searchsorted(keys, torch.log(q), right=True)
        return torch.where(q > 0, first, torch.zeros_like(first))
    return torch.where(q > 0, schedule._boundary(q), torch.zeros_like(q))


def _usable(schedule: Process, bound: Tensor) -> Tensor:
    if isinstance(schedule, NoiseSchedule):
        return bound < schedule.num_timesteps
    if isinstance(schedule, EDMSchedule):
        return bound < (math.inf if schedule.sigma_max is None else schedule.sigma_max)
    return bound < 1.0


def timestep_lower_bound(schedule: Process, risk: Tensor, *, perturbation: str = "gaussian", margin: float = 0.0,
                         numel_per_sample: Optional[int] = None) -> Tensor:
    """Each sample's ``t_min(r)`` ([B], on ``risk``'s device), from its largest risk.

    - :class:`NoiseSchedule`: the smallest usable integer step (``t >= t_min``; ``T`` when none is), found by
      ``searchsorted`` on the schedule's log-SNR.
    - continuous schedules: the closed-form boundary, float64 (usable ``t > t_min``; for EDM ``t`` is sigma).

    ``risk``: ``[B]`` or ``[B, ...]`` (per element: the sample's maximum counts). ``margin`` in ``[0, 1)``:
    require ``v^2 > margin * sigma_t^2``. ``numel_per_sample``: D for a Cauchy perturbation with a ``[B]`` risk.
    Negative, NaN or infinite risk raises ``ValueError`` (one host sync per call on an accelerator).
    """
    _check_process(schedule)
    rb = _checked_risk_bound("timestep_lower_bound", risk, perturbation, margin, numel_per_sample)
    return _lower_bound(schedule, rb.q)


def usable_samples(schedule: Process, risk: Tensor, *, perturbation: str = "gaussian", margin: float = 0.0,
                   numel_per_sample: Optional[int] = None) -> Tensor:
    """Boolean ``[B]``: which samples have a non-empty stability interval on ``schedule`` (arguments as in
    :func:`timestep_lower_bound`). Use it to drop unusable samples explicitly before :func:`sample_timesteps`.
    Negative, NaN or infinite risk raises ``ValueError`` (one host sync per call on an accelerator)."""
    _check_process(schedule)
    rb = _checked_risk_bound("usable_samples", risk, perturbation, margin, numel_per_sample)
    return _usable(schedule, _lower_bound(schedule, rb.q))


def sample_timesteps(schedule: Process, risk: Tensor, *, perturbation: str = "gaussian", margin: float = 0.0,
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
    _check_process(schedule)
    rb = _risk_bound(risk, perturbation, margin, numel_per_sample)
    bound = _lower_bound(schedule, rb.q)
    usable = _usable(schedule, bound)
    invalid_risk, empty = _host_counts(rb.invalid, (~usable).sum())
    if invalid_risk:
        _raise_invalid_risk("sample_timesteps", risk)
    if empty:
        _raise_empty_intervals(schedule, empty, rb, perturbation, margin)
    if isinstance(schedule, NoiseSchedule):
        steps = schedule.num_timesteps
        u = torch.rand(bound.shape, generator=generator, device=bound.device, dtype=torch.float64)
        return (bound + torch.floor(u * (steps - bound).double()).long()).clamp(max=steps - 1)
    return schedule._sample_above(bound, generator)


def _raise_empty_intervals(schedule: Process, count: int, rb: _RiskBound, perturbation: str, margin: float) -> None:
    if isinstance(schedule, NoiseSchedule):
        smallest_snr = float(schedule.snr[-1])
        largest_q = math.inf if smallest_snr == 0 else 1.0 / smallest_snr
    else:
        largest_q = schedule._largest_q()
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
                 schedule: Optional[Process] = None, prediction_type: str = "epsilon",
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
    _check_process(schedule)
    kind = _canonical_risk_prediction_type(prediction_type)
    if kind == "v_prediction" and _process_kind(schedule) != "vp":
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
    alpha, sigma = _coefficients(schedule, t, torch.promote_types(sample.dtype, torch.float32), "risk_noising")
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
                   loss: Union[str, RobustDiffusionLoss] = "kl", schedule: Optional[Process] = None,
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
    discrete = isinstance(schedule, NoiseSchedule)
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
