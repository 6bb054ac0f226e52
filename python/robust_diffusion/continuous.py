"""Continuous-time noise processes behind the :class:`~robust_diffusion.schedules.Schedule` interface
(docs/DESIGN.md, Schedules): Song et al.'s VP and VE SDEs on ``t`` in ``[eps, 1]`` and EDM, whose time is the noise
level ``sigma`` itself. The risk module (:mod:`robust_diffusion.risk`) takes any of them, as it takes a
:class:`~robust_diffusion.NoiseSchedule`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["ContinuousVPSchedule", "EDMSchedule", "VESchedule"]


class _UnitTimeSchedule(Schedule):
    """A continuous process on ``t`` in ``[eps, 1]``, drawn uniformly for training."""

    eps: float

    def check_timesteps(self, t: Tensor, argument: str = "t", *, caller: Optional[str] = None) -> Tensor:
        where = f"{caller}: {argument}" if caller else argument
        _check_one_per_sample(t, where)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{where} must hold floating-point times in [0, 1] for a continuous schedule, got dtype "
                            f"{t.dtype}")
        if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"{where} must lie in [0, 1] for a continuous schedule, got values in "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        return t

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
    training default, every bound has times past it).
    """

    process = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_max: Optional[float] = None):
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std!r}")
        if sigma_max is not None and not sigma_max > 0:
            raise ValueError(f"sigma_max must be positive or None, got {sigma_max!r}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    def check_timesteps(self, t: Tensor, argument: str = "t", *, caller: Optional[str] = None) -> Tensor:
        where = f"{caller}: {argument}" if caller else argument
        _check_one_per_sample(t, where)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{where} must hold floating-point noise levels sigma for EDMSchedule, got dtype "
                            f"{t.dtype}")
        if t.device.type == "cpu" and t.numel() and not bool((t > 0).all()):
            raise ValueError(f"{where} must hold positive noise levels sigma for EDMSchedule")
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
        return f"EDMSchedule(p_mean={self.p_mean}, p_std={self.p_std}, sigma_max={self.sigma_max})"


def _check_one_per_sample(t: Tensor, where: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{where} must be a 1-D tensor with one time per sample, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
