"""Continuous-time noise processes behind the :class:`~robust_diffusion.schedules.Schedule` interface
(docs/DESIGN.md, Schedules): Song et al.'s VP and VE SDEs on ``t`` in ``[eps, 1]``, EDM, whose time is the noise
level ``sigma`` itself, and flow matching (rectified flow, ``x_t = (1 - t) x0 + t eps``). The risk module (:mod:`robust_diffusion.risk`) takes any of them, as it takes a
:class:`~robust_diffusion.NoiseSchedule`.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from .schedules import NoiseSchedule, Schedule

__all__ = ["ContinuousVPSchedule", "CosineVPSchedule", "EDMSchedule", "FLOW_TIMESTEP_SAMPLING", "FlowMatchingSchedule", "VESchedule",
           "schedule_from_diffusers"]

#: How :class:`FlowMatchingSchedule` draws training times (diffusers' ``weighting_scheme`` names).
FLOW_TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")


class _UnitTimeSchedule(Schedule):
    """A continuous process on ``t`` in ``[eps, 1]``, drawn uniformly for training."""

    eps: float

    def check_timesteps(self, t: Tensor, argument: str = "t", *, caller: Optional[str] = None) -> Tensor:
        where = _checked_float_times(t, argument, caller, "times in [0, 1] for a continuous schedule")
        _check_values(t, (t >= 0) & (t <= 1), f"{where} must lie in [0, 1] for a continuous schedule",
                      lambda: f", got values in [{t.min().item():.4g}, {t.max().item():.4g}]"
                              + (self._out_of_range_hint if t.max().item() > 1 else ""))
        return t

    #: What a time above 1 most likely was, for the message that refuses it.
    _out_of_range_hint = ""

    def coefficients(self, t: Tensor, dtype: torch.dtype = torch.float32, *, caller: Optional[str] = None
                     ) -> Tuple[Optional[Tensor], Tensor]:
        self.check_timesteps(t, caller=caller)
        alpha, sigma = self._coefficients(t.double())
        return (None if alpha is None else alpha.to(dtype)), sigma.to(dtype)

    def _coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Float64 times uniform on ``(eps, 1]``."""
        return self.sample_timesteps_above(torch.zeros(batch_size, device=device, dtype=torch.float64), generator)

    def sample_timesteps_above(self, lower: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Uniform on ``(max(lower, eps), 1]``: never the (excluded) bound itself."""
        lower = lower.clamp(min=self.eps)
        u = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=torch.float64)
        return 1.0 - u * (1.0 - lower)

    def has_time_after(self, bound: Tensor) -> Tensor:
        return bound < 1.0

    def lower_time_bound(self, q: Tensor) -> Tensor:
        return torch.where(q > 0, self._boundary(q), torch.zeros_like(q))

    def _boundary(self, q: Tensor) -> Tensor:
        raise NotImplementedError


class ContinuousVPSchedule(_UnitTimeSchedule):
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

    def _coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        big_b = self.integrated_beta(t)
        return torch.exp(-0.5 * big_b), torch.sqrt(-torch.expm1(-big_b))

    def _boundary(self, q: Tensor) -> Tensor:
        log_q = torch.log1p(q)
        slope = self.beta_max - self.beta_min
        return 2.0 * log_q / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * slope * log_q))

    def min_snr(self) -> float:
        return 1.0 / math.expm1(self.beta_min + 0.5 * (self.beta_max - self.beta_min))

    def __repr__(self) -> str:
        return f"ContinuousVPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, eps={self.eps})"


class CosineVPSchedule(_UnitTimeSchedule):
    """The continuous-time cosine VP process (Nichol & Dhariwal; the limit of ``NoiseSchedule.cosine`` as T grows):
    ``abar(t) = f(t) / f(0)`` with ``f(t) = cos^2((t + s) / (1 + s) pi / 2)`` on ``t`` in ``[eps, 1]``; ``alpha =
    sqrt(abar)``, ``sigma = sqrt(1 - abar)``. ``abar(1)`` is 0 up to rounding (SNR about 1e-33: the losses bound
    log-SNR), and the stability bound is closed form: ``SNR(t) q < 1`` for ``abar < 1 / (1 + q)``, i.e. ``t >
    (1 + s) (2 / pi) arccos(sqrt(f(0) / (1 + q))) - s``.
    """

    process = "vp"

    def __init__(self, s: float = 0.008, eps: float = 1e-5):
        if not s > 0:
            raise ValueError(f"CosineVPSchedule: s must be positive, got {s!r}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
        self.s, self.eps = float(s), float(eps)
        self._f0 = math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2

    def _angle(self, t: Tensor) -> Tensor:
        return (t.double() + self.s) / (1 + self.s) * (math.pi / 2)

    def log_snr(self, t: Tensor) -> Tensor:
        abar = torch.cos(self._angle(t)).square() / self._f0
        return torch.log(abar) - torch.log1p(-abar)

    def _coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        abar = (torch.cos(self._angle(t)).square() / self._f0).clamp(0.0, 1.0)
        return torch.sqrt(abar), torch.sqrt(1.0 - abar)

    def _boundary(self, q: Tensor) -> Tensor:
        angle = torch.arccos(torch.sqrt(self._f0 / (1.0 + q)))
        return ((1 + self.s) * angle / (math.pi / 2) - self.s).clamp(min=0.0)

    def min_snr(self) -> float:
        abar = math.cos((1 + self.s) / (1 + self.s) * math.pi / 2) ** 2 / self._f0
        return abar / (1.0 - abar)

    def __repr__(self) -> str:
        return f"CosineVPSchedule(s={self.s}, eps={self.eps})"


class VESchedule(_UnitTimeSchedule):
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
        return -torch.log(self._coefficients(t.double())[1].square())

    def _coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        return None, self.sigma_min * torch.sqrt(torch.expm1(2.0 * self._log_rho * t))

    def _boundary(self, q: Tensor) -> Tensor:
        return torch.log1p(q / self.sigma_min ** 2) / (2.0 * self._log_rho)

    def min_snr(self) -> float:
        return 1.0 / (self.sigma_max ** 2 - self.sigma_min ** 2)

    def __repr__(self) -> str:
        return f"VESchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, eps={self.eps})"


class EDMSchedule(Schedule):
    """Karras et al. (EDM): the time variable is the noise level ``sigma`` itself; ``alpha = 1``.

    Training draws ``log sigma ~ N(p_mean, p_std^2)``; :meth:`sample_timesteps_above` draws from that distribution
    truncated to ``sigma > lower`` (and to ``sigma <= sigma_max`` when given; with ``sigma_max=None``, EDM's
    training default, every bound has times past it). ``sigma_data`` (the data's std, EDM's preconditioning and its
    loss weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, the ``"edm"`` weighting in x0 space) and
    ``sigma_min`` (the sampler's lowest level) are carried for the sampler and the weighting; training times are
    not clipped to ``sigma_min``, as in EDM.
    """

    process = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_max: Optional[float] = None, *,
                 sigma_min: float = 0.002, sigma_data: float = 0.5):
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std!r}")
        if sigma_max is not None and not sigma_max > 0:
            raise ValueError(f"sigma_max must be positive or None, got {sigma_max!r}")
        if not (sigma_min > 0 and sigma_data > 0) or (sigma_max is not None and not sigma_min < sigma_max):
            raise ValueError(f"EDMSchedule: sigma_min and sigma_data must be positive and sigma_min below sigma_max, "
                             f"got sigma_min={sigma_min!r}, sigma_data={sigma_data!r}, sigma_max={sigma_max!r}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_max = None if sigma_max is None else float(sigma_max)
        self.sigma_min, self.sigma_data = float(sigma_min), float(sigma_data)

    @classmethod
    def from_diffusers(cls, scheduler, p_mean: float = -1.2, p_std: float = 1.2) -> "EDMSchedule":
        """The schedule of a diffusers ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler``: its ``sigma_min``,
        ``sigma_max`` and ``sigma_data`` (the training density ``p_mean``, ``p_std`` is the training script's:
        pass it). Its ``prediction_type`` names the preconditioned network's output (EDM's F), which this schedule
        does not model: train on the denoised ``D = c_skip x + c_out F`` with ``prediction_type="sample"`` and the
        ``"edm"`` weighting (docs/DESIGN.md, Weighting)."""
        config = getattr(scheduler, "config", None)
        if config is None or not all(hasattr(config, key) for key in ("sigma_min", "sigma_max", "sigma_data")):
            raise TypeError(f"EDMSchedule.from_diffusers: expected an EDM scheduler (a config with sigma_min, "
                            f"sigma_max and sigma_data), got {type(scheduler).__name__}")
        return cls(p_mean=p_mean, p_std=p_std, sigma_max=float(config.sigma_max), sigma_min=float(config.sigma_min),
                   sigma_data=float(config.sigma_data))

    def check_timesteps(self, t: Tensor, argument: str = "t", *, caller: Optional[str] = None) -> Tensor:
        where = _checked_float_times(t, argument, caller, "noise levels sigma for EDMSchedule")
        _check_values(t, t > 0, f"{where} must hold positive noise levels sigma for EDMSchedule", lambda: "")
        return t

    def log_snr(self, sigma: Tensor) -> Tensor:
        return -2.0 * torch.log(sigma.double())

    def coefficients(self, t: Tensor, dtype: torch.dtype = torch.float32, *, caller: Optional[str] = None
                     ) -> Tuple[Optional[Tensor], Tensor]:
        self.check_timesteps(t, caller=caller)
        return None, t.double().to(dtype)

    def sample_timesteps(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Float64 sigmas from the log-normal training distribution (up to ``sigma_max`` when given)."""
        return self.sample_timesteps_above(torch.zeros(batch_size, device=device, dtype=torch.float64), generator)

    def lower_time_bound(self, q: Tensor) -> Tensor:
        return torch.where(q > 0, torch.sqrt(q), torch.zeros_like(q))

    def has_time_after(self, bound: Tensor) -> Tensor:
        return bound < (math.inf if self.sigma_max is None else self.sigma_max)

    def min_snr(self) -> float:
        return 0.0 if self.sigma_max is None else 1.0 / self.sigma_max ** 2

    def sample_timesteps_above(self, lower: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
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

    def __repr__(self) -> str:
        return (f"EDMSchedule(p_mean={self.p_mean}, p_std={self.p_std}, sigma_max={self.sigma_max}, "
                f"sigma_min={self.sigma_min}, sigma_data={self.sigma_data})")


class FlowMatchingSchedule(_UnitTimeSchedule):
    _out_of_range_hint = (" (diffusers' flow-matching timesteps are sigma * num_train_timesteps: pass the sigmas, "
                          "e.g. timesteps / 1000)")

    """Flow matching / rectified flow (SD3, Flux): ``x_t = (1 - t) x0 + t eps`` on ``t`` in ``[0, 1]``, so
    ``alpha = 1 - t``, ``sigma = t`` and ``SNR = ((1 - t) / t)^2``; the model learns the velocity ``eps - x0``
    (``prediction_type="flow_prediction"``). ``t`` is diffusers' sigma (its timestep divided by
    ``num_train_timesteps``).

    Training times follow SD3 (diffusers' ``compute_density_for_timestep_sampling``): ``u`` uniform, logit-normal
    (``sigmoid(N(logit_mean, logit_std^2))``) or "mode" (``1 - v - mode_scale (cos^2(pi v / 2) - 1 + v)`` for
    uniform ``v``), then the resolution shift ``t = shift u / (1 + (shift - 1) u)``. :meth:`sample_timesteps`
    draws ``u`` exactly as diffusers does (float32, the same generator calls), so the same seed gives the same
    times.
    """

    process = "flow"
    prediction_type = "flow_prediction"

    def __init__(self, shift: float = 1.0, timestep_sampling: str = "uniform", *, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, eps: float = 0.0,
                 num_train_timesteps: int = 1000):
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"FlowMatchingSchedule: shift must be a positive number, got {shift!r}")
        if timestep_sampling not in FLOW_TIMESTEP_SAMPLING:
            raise ValueError(f"FlowMatchingSchedule: timestep_sampling must be one of {FLOW_TIMESTEP_SAMPLING}, got "
                             f"{timestep_sampling!r}")
        if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std > 0):
            raise ValueError(f"FlowMatchingSchedule: logit_mean must be finite and logit_std positive, got "
                             f"{logit_mean!r}, {logit_std!r}")
        # The mode density's map v -> u must fall monotonically (du/dv < 0 on [0, 1]) to be a density at all.
        if not -1.0 < mode_scale < 1.0 / (math.pi / 2 - 1):
            raise ValueError(f"FlowMatchingSchedule: mode_scale must lie in (-1, {1.0 / (math.pi / 2 - 1):.4f}), "
                             f"where the mode density is defined, got {mode_scale!r}")
        if not 0 <= eps < 1:
            raise ValueError(f"FlowMatchingSchedule: eps must lie in [0, 1), got {eps!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"FlowMatchingSchedule: num_train_timesteps must be a positive integer, got "
                             f"{num_train_timesteps!r}")
        self.num_train_timesteps = num_train_timesteps
        self.shift, self.timestep_sampling = float(shift), timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self.eps = float(eps)

    @classmethod
    def from_diffusers(cls, scheduler, timestep_sampling: str = "uniform", **sampling) -> "FlowMatchingSchedule":
        """The schedule of a diffusers ``FlowMatchEulerDiscreteScheduler``: its ``shift`` (training-time settings
        such as ``timestep_sampling``/``logit_mean`` are the training script's, not the scheduler's: pass them).
        ``use_dynamic_shifting`` (a shift that depends on the image resolution) and ``invert_sigmas`` are refused:
        pass the shift you train with. The inference-only options (Karras, exponential or beta sigmas,
        ``shift_terminal``) do not change training and are ignored."""
        config = getattr(scheduler, "config", None)
        if config is None or not hasattr(config, "shift") or not hasattr(config, "num_train_timesteps"):
            raise TypeError(f"FlowMatchingSchedule.from_diffusers: expected a FlowMatchEulerDiscreteScheduler (a "
                            f"config with shift and num_train_timesteps), got {type(scheduler).__name__}")
        if getattr(config, "use_dynamic_shifting", False):
            raise ValueError("FlowMatchingSchedule.from_diffusers: the scheduler uses dynamic shifting (the shift "
                             "depends on the image resolution); build FlowMatchingSchedule(shift=...) with the shift "
                             "you train at")
        if getattr(config, "invert_sigmas", False):
            raise ValueError("FlowMatchingSchedule.from_diffusers: invert_sigmas=True (t = 1 is clean) is not "
                             "supported; this schedule has t = 0 clean")
        return cls(shift=float(config.shift), timestep_sampling=timestep_sampling,
                   num_train_timesteps=int(config.num_train_timesteps), **sampling)

    def model_timestep(self, t: Tensor) -> Tensor:
        """diffusers' convention: the network is given ``t * num_train_timesteps`` (float32)."""
        return t.float() * self.num_train_timesteps

    def inference_times(self, num_steps: int) -> Tensor:
        """The times of a ``num_steps``-step sampler, float64 ``[num_steps + 1]``: ``num_steps`` points uniform in the
        unshifted time from 1 to ``1 / num_train_timesteps``, shifted as training times are, then 0 (diffusers'
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` grid, which shifts its lowest time twice where this shifts
        it once: equal at shift 1). The last step, to 0, is tiny: where a Heun sampler takes its Euler step."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"FlowMatchingSchedule.inference_times: num_steps must be a positive integer, got "
                             f"{num_steps!r}")
        lowest = 1.0 / self.num_train_timesteps
        grid = torch.linspace(1.0, lowest, num_steps, dtype=torch.float64) if num_steps > 1 else torch.ones(1).double()
        return torch.cat([self.shifted(grid), torch.zeros(1, dtype=torch.float64)])

    def shifted(self, u: Tensor) -> Tensor:
        """The resolution shift ``shift u / (1 + (shift - 1) u)`` (identity at shift 1)."""
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    def _unshifted(self, t: Tensor) -> Tensor:
        return t / (self.shift - (self.shift - 1.0) * t)

    def log_snr(self, t: Tensor) -> Tensor:
        t = t.double()
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def _coefficients(self, t: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        return 1.0 - t, t

    def _boundary(self, q: Tensor) -> Tensor:  # ((1 - t) / t)^2 q < 1  <=>  t > sqrt(q) / (1 + sqrt(q))
        root = torch.sqrt(q)
        return root / (1.0 + root)

    def min_snr(self) -> float:
        return 0.0

    def sample_timesteps(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Float64 training times: ``u`` drawn as diffusers' ``compute_density_for_timestep_sampling`` draws it
        (float32), then shifted, and kept at least ``eps``."""
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.normal(mean=self.logit_mean, std=self.logit_std, size=(batch_size,),
                                           device=device, generator=generator))
        elif self.timestep_sampling == "mode":
            v = torch.rand(size=(batch_size,), device=device, generator=generator)
            u = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        else:
            u = torch.rand(size=(batch_size,), device=device, generator=generator)
        return self.shifted(u.double()).clamp(min=self.eps)

    def sample_timesteps_above(self, lower: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The training distribution truncated to ``t > max(lower, eps)``, by its inverse CDF in float64 (another
        stream than :meth:`sample_timesteps`)."""
        lower = lower.double().clamp(min=self.eps)
        u_low = self._unshifted(lower)  # the shift is increasing: t > lower  <=>  u > u_low
        draw = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=torch.float64)
        if self.timestep_sampling == "uniform":
            u = 1.0 - draw * (1.0 - u_low)
        elif self.timestep_sampling == "logit_normal":
            def survival(z: Tensor) -> Tensor:
                return 0.5 * torch.special.erfc(z / math.sqrt(2.0))

            z_low = (torch.logit(u_low) - self.logit_mean) / self.logit_std  # -inf at u_low = 0
            tail = survival(z_low) * (1.0 - draw)  # in (0, S(z_low)]
            u = torch.sigmoid(self.logit_mean - self.logit_std * torch.special.ndtri(tail))
        else:  # mode: u(v) falls from 1 to 0; u > u_low  <=>  v < v_low, found by bisection
            v_low = self._mode_inverse(u_low)
            v = draw * v_low
            u = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        t = self.shifted(u)
        just_above = torch.nextafter(lower, torch.full_like(lower, 2.0))
        return torch.minimum(torch.maximum(t, just_above), torch.ones_like(t))

    def _mode_inverse(self, u: Tensor) -> Tensor:
        low, high = torch.zeros_like(u), torch.ones_like(u)
        for _ in range(60):  # float64: 60 halvings of [0, 1] reach its resolution
            middle = 0.5 * (low + high)
            value = 1 - middle - self.mode_scale * (torch.cos(math.pi * middle / 2) ** 2 - 1 + middle)
            above = value > u
            low, high = torch.where(above, middle, low), torch.where(above, high, middle)
        return low

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: Optional[str] = None) -> Tensor:
        """``"flow_prediction"`` (alias ``"flow"``, the default): the velocity ``eps - x0``; ``"epsilon"``, ``"sample"``
        as for every schedule."""
        kind = prediction_type or self.prediction_type
        if kind in ("flow_prediction", "flow"):
            return noise - x0
        return super().training_target(x0, noise, t, kind)

    def __repr__(self) -> str:
        sampling = {"uniform": "", "logit_normal": f", logit_mean={self.logit_mean}, logit_std={self.logit_std}",
                    "mode": f", mode_scale={self.mode_scale}"}[self.timestep_sampling]
        return (f"FlowMatchingSchedule(shift={self.shift}, timestep_sampling={self.timestep_sampling!r}{sampling}, "
                f"eps={self.eps})")


def as_schedule(schedule: object, caller: str) -> Schedule:
    """What every function and module that takes a ``schedule`` makes of it: a :class:`Schedule` as it is, a
    diffusers scheduler (``DDPMScheduler`` and the rest of the DDPM family, ``FlowMatchEulerDiscreteScheduler``, the
    EDM schedulers) mapped by :func:`schedule_from_diffusers` (once per scheduler object); anything else, or a
    scheduler that cannot be mapped, is refused with a one-line TypeError that says why."""
    if isinstance(schedule, Schedule):
        return schedule
    if not _is_diffusers_scheduler(schedule):
        raise TypeError(f"{caller}: schedule must be a robust_diffusion schedule (rd.NoiseSchedule, "
                        f"rd.FlowMatchingSchedule, rd.EDMSchedule, ...) or a diffusers scheduler, got "
                        f"{type(schedule).__name__}")
    try:
        return _MAPPED_SCHEDULERS[schedule]
    except (KeyError, TypeError):
        pass
    try:
        mapped = schedule_from_diffusers(schedule)
    except (TypeError, ValueError) as error:
        reason = str(error).removeprefix("schedule_from_diffusers: ")
        raise TypeError(f"{caller}: the diffusers scheduler {type(schedule).__name__} cannot be used as a schedule: "
                        f"{reason}") from None
    try:
        _MAPPED_SCHEDULERS[schedule] = mapped
    except TypeError:  # not weakly referenceable: mapped again next time
        pass
    return mapped


#: Diffusers schedulers already mapped, so a loss called each step with one does not rebuild its schedule.
_MAPPED_SCHEDULERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _is_diffusers_scheduler(obj: object) -> bool:
    """A diffusers scheduler, or an object shaped like one (a ``config`` with ``num_train_timesteps``)."""
    return type(obj).__module__.split(".")[0] == "diffusers" or hasattr(getattr(obj, "config", None),
                                                                        "num_train_timesteps")


def schedule_from_diffusers(scheduler, **sampling) -> Schedule:
    """The schedule of a diffusers scheduler: a :class:`~robust_diffusion.NoiseSchedule` for the DDPM family (an
    ``alphas_cumprod`` table), a :class:`FlowMatchingSchedule` for ``FlowMatchEulerDiscreteScheduler`` and an
    :class:`EDMSchedule` for the EDM schedulers (``sampling``: the training-time options, e.g.
    ``timestep_sampling="logit_normal"`` or ``p_mean=-1.2, p_std=1.2``)."""
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        if sampling:
            raise TypeError(f"schedule_from_diffusers: {', '.join(sampling)} apply to flow matching only")
        return NoiseSchedule.from_diffusers(scheduler)
    if hasattr(getattr(scheduler, "config", None), "shift"):
        return FlowMatchingSchedule.from_diffusers(scheduler, **sampling)
    if hasattr(getattr(scheduler, "config", None), "sigma_data"):
        return EDMSchedule.from_diffusers(scheduler, **sampling)
    raise TypeError(f"schedule_from_diffusers: {type(scheduler).__name__} is neither a DDPM-family scheduler "
                    f"(alphas_cumprod), a flow-matching one (config.shift) nor an EDM one (config.sigma_data)")


def _check_values(t: Tensor, ok: Tensor, message: str, found) -> None:
    """A ValueError (``message`` + ``found()``) when some ``ok`` is False: at once for CPU tensors in eager mode; an
    asynchronous device assertion on an accelerator and under torch.compile (reading the values there would sync
    or break the graph), as for the discrete steps."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if t.numel() and not bool(ok.all()):
            raise ValueError(message + found())
    elif t.device.type != "meta":
        torch._assert_async(ok.all(), message)


def _checked_float_times(t: Tensor, argument: str, caller: Optional[str], what: str) -> str:
    """Check that ``t`` holds one floating-point time per sample; return the name the messages use."""
    where = f"{caller}: {argument}" if caller else argument
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{where} must be a 1-D tensor with one time per sample, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where} must hold floating-point {what}, got dtype {t.dtype}")
    return where
