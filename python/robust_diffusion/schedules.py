"""Noise schedules: the :class:`Schedule` interface every process implements, and the discrete DDPM / VP
:class:`NoiseSchedule`, computed in float64 (the continuous processes are in :mod:`robust_diffusion.continuous`).

Conventions (docs/DESIGN.md, Notation): T steps indexed 0..T-1 (t = 0 is already slightly noisy),
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, ``SNR_t = abar_t / (1 - abar_t)``,
``log_snr = log SNR_t``. Everything is kept in float64 on the CPU and computed stably
(``1 - abar = -expm1(sum log1p(-beta))``); per-sample lookups (:meth:`NoiseSchedule.gather`)
are cast to the caller's device and dtype at the end, with no host round-trip.

Zero terminal SNR (``abar_{T-1} = 0``) is allowed: ``log_snr`` is then ``-inf`` at the last step
and consumers (weighting, scales) handle the limit explicitly.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "Schedule", "check_count"]

_PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "sample": "sample", "x0": "sample",
                       "v": "v_prediction", "v_prediction": "v_prediction"}


def canonical_prediction_type(prediction_type: str) -> str:
    """Map ``eps``/``epsilon``, ``x0``/``sample`` and ``v``/``v_prediction`` to diffusers' names."""
    try:
        return _PREDICTION_ALIASES[prediction_type]
    except KeyError:
        raise ValueError(f"prediction_type must be one of {sorted(_PREDICTION_ALIASES)}, "
                         f"got {prediction_type!r}") from None


def prediction_type_for(schedule: "Schedule", prediction_type: Optional[str], caller: str) -> str:
    """``prediction_type`` (default: the schedule's) in diffusers' name, checked against the process:
    ``v_prediction`` needs a VP process, ``flow_prediction`` (alias ``flow``) a flow-matching one."""
    kind = prediction_type or schedule.prediction_type
    if kind in ("flow_prediction", "flow"):
        if schedule.process != "flow":
            raise ValueError(f"{caller}: prediction_type 'flow_prediction' needs a flow-matching schedule, not "
                             f"{schedule!r}")
        return "flow_prediction"
    kind = canonical_prediction_type(kind)
    if kind == "v_prediction" and schedule.process != "vp":
        raise ValueError(f"{caller}: prediction_type 'v_prediction' is defined for VP processes, not {schedule!r}")
    return kind


class Schedule:
    """What makes a noise process a schedule (docs/DESIGN.md, Schedules): ``x_t = alpha_t x0 + sigma_t eps`` at
    per-sample times ``t``, with these methods. Everything that takes a schedule (the risk module, and the losses
    as they learn continuous time) uses only them.

    Attributes:
        discrete: True for integer step indices ``t`` in ``[0, T)`` (:class:`NoiseSchedule`), False for float times.
        process: ``"vp"`` (``alpha^2 + sigma^2 = 1``: v-prediction is defined), ``"ve"`` or ``"edm"`` (``alpha = 1``).
        prediction_type: what a model trained on it predicts by default.
    """

    discrete: bool = False
    process: str = "vp"
    prediction_type: str = "epsilon"

    def check_timesteps(self, t: Tensor, argument: str = "t", *, caller: Optional[str] = None) -> Tensor:
        """Validate per-sample times ``t`` ``[B]`` (messages name ``argument`` and the public ``caller``)."""
        raise NotImplementedError

    def coefficients(self, t: Tensor, dtype: torch.dtype = torch.float32, *, caller: Optional[str] = None
                     ) -> Tuple[Optional[Tensor], Tensor]:
        """Per-sample ``(alpha, sigma)`` at ``t`` ([B] each, on ``t``'s device, computed in float64 and cast to
        ``dtype``); ``alpha`` is ``None`` where it is 1 (VE, EDM)."""
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """Per-sample ``log(alpha^2 / sigma^2)`` at ``t`` (float64, on ``t``'s device)."""
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """``batch_size`` times from the process's training distribution."""
        raise NotImplementedError

    def lower_time_bound(self, q: Tensor) -> Tensor:
        """Per sample, where ``SNR_t q < 1`` starts (``q >= 0``): the smallest usable integer step for a discrete
        schedule (``t >= bound``), the boundary itself for a continuous one (``t > bound``); the start of time
        where ``q = 0``."""
        raise NotImplementedError

    def has_time_after(self, bound: Tensor) -> Tensor:
        """Bool per sample: whether some time of the schedule lies past ``bound`` (from :meth:`lower_time_bound`)."""
        raise NotImplementedError

    def sample_timesteps_above(self, lower: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Per sample, a time from the training distribution restricted to ``t`` past ``lower``."""
        raise NotImplementedError

    def min_snr(self) -> float:
        """The smallest SNR the schedule reaches (0 at zero terminal SNR or an unbounded sigma)."""
        raise NotImplementedError

    def model_timestep(self, t: Tensor) -> Tensor:
        """What a network is given as its timestep for time ``t``: ``t`` itself (the discrete step), unless the
        process has a convention of its own (flow matching: diffusers' ``sigma * num_train_timesteps``)."""
        return t

    def q_sample(self, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """``x_t = alpha_t x0 + sigma_t noise`` (noise drawn if not given)."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        _check_batch(x0, t)
        alpha, sigma = self.coefficients(t, torch.promote_types(x0.dtype, torch.float32),
                                         caller=f"{type(self).__name__}.q_sample")
        shape = (-1,) + (1,) * (x0.dim() - 1)
        scaled = x0 if alpha is None else alpha.reshape(shape) * x0
        return (scaled + sigma.reshape(shape) * noise).to(x0.dtype)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: Optional[str] = None) -> Tensor:
        """What the model should predict for ``prediction_type`` (defaults to the schedule's); ``v_prediction``
        (``alpha eps - sigma x0``) only for a VP process."""
        kind = canonical_prediction_type(prediction_type or self.prediction_type)
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        if self.process != "vp":
            raise ValueError(f"prediction_type 'v_prediction' is defined for VP processes, not {self!r}")
        _check_batch(x0, t)
        alpha, sigma = self.coefficients(t, torch.promote_types(x0.dtype, torch.float32),
                                         caller=f"{type(self).__name__}.training_target")
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return (alpha.reshape(shape) * noise - sigma.reshape(shape) * x0).to(x0.dtype)


class NoiseSchedule(Schedule):
    """A discrete variance-preserving noise schedule.

    Build it with :meth:`linear`, :meth:`cosine`, :meth:`scaled_linear`, :meth:`from_alphas_cumprod`
    or :meth:`from_diffusers`. All exposed tensors are float64 on the CPU with shape ``[T]``.
    """

    discrete = True
    process = "vp"

    def __init__(self, betas: Tensor, *, prediction_type: str = "epsilon",
                 _alphas_cumprod: Optional[Tensor] = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and lie in [0, 1]")
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.betas = betas
        self.alphas = 1.0 - betas
        if _alphas_cumprod is None:
            # Stable products: log abar = sum log1p(-beta); 1 - abar = -expm1(log abar).
            log_abar = torch.cumsum(torch.log1p(-betas), 0)
            self.alphas_cumprod = torch.exp(log_abar)
            self.one_minus_alphas_cumprod = -torch.expm1(log_abar) + 0.0  # + 0.0: -0.0 at beta = 0 becomes +0.0
        else:
            self.alphas_cumprod = _alphas_cumprod
            self.one_minus_alphas_cumprod = 1.0 - _alphas_cumprod
        if not self.one_minus_alphas_cumprod[-1] > 0:
            raise ValueError("the schedule adds no noise: alphas_cumprod is 1 at its last step (every beta is 0), so "
                             "there would be nothing to denoise; check the betas or alphas_cumprod given")
        self._device_cache: Dict[Tuple[str, torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
               zero_terminal_snr: bool = False, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """DDPM's linear beta schedule (default 1e-4 -> 0.02 over 1000 steps)."""
        _check_steps(num_timesteps)
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls._finish(betas, zero_terminal_snr, prediction_type)

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *,
                      zero_terminal_snr: bool = False, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """Stable Diffusion's schedule: betas linear in sqrt(beta)."""
        _check_steps(num_timesteps)
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2
        return cls._finish(betas, zero_terminal_snr, prediction_type)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
               zero_terminal_snr: bool = False, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """The iDDPM cosine schedule (diffusers' ``squaredcos_cap_v2``), betas capped at ``max_beta``."""
        _check_steps(num_timesteps)
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)
        return cls._finish(betas, zero_terminal_snr, prediction_type)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, *, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """Any ``alphas_cumprod`` tensor, e.g. a diffusers scheduler's (possibly fp16/bf16: values that
        rounded to exactly 1 give SNR = inf at those steps, which consumers handle explicitly)."""
        abar = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64).clone()
        if abar.dim() != 1 or abar.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}")
        if not torch.isfinite(abar).all() or (abar < 0).any() or (abar > 1).any():
            raise ValueError("alphas_cumprod must be finite and lie in [0, 1]")
        if (abar[1:] > abar[:-1]).any():
            raise ValueError("alphas_cumprod must be non-increasing in t")
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        alphas = torch.where(prev > 0, abar / prev.clamp_min(torch.finfo(torch.float64).tiny), abar.new_zeros(()))
        return cls(1.0 - alphas, prediction_type=prediction_type, _alphas_cumprod=abar)

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        """Duck-typed on ``scheduler.alphas_cumprod`` and ``scheduler.config.prediction_type``."""
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            hint = ("; for a flow-matching scheduler use rd.FlowMatchingSchedule.from_diffusers(scheduler) (or "
                    "rd.schedule_from_diffusers)" if hasattr(getattr(scheduler, "config", None), "shift") else "")
            raise TypeError(f"scheduler must have an 'alphas_cumprod' tensor, got {type(scheduler).__name__}{hint}")
        config = getattr(scheduler, "config", None)
        prediction_type = getattr(config, "prediction_type", None) or "epsilon"
        return cls.from_alphas_cumprod(abar, prediction_type=prediction_type)

    @classmethod
    def _finish(cls, betas: Tensor, zero_terminal_snr: bool, prediction_type: str) -> "NoiseSchedule":
        schedule = cls(betas, prediction_type=prediction_type)
        if zero_terminal_snr:
            if schedule.num_timesteps < 2 or not schedule.alphas_cumprod[0] > schedule.alphas_cumprod[-1]:
                raise ValueError(f"zero_terminal_snr needs at least 2 timesteps with alphas_cumprod falling from the "
                                 f"first to the last (it rescales them onto [0, abar_0]), got T = "
                                 f"{schedule.num_timesteps}, alphas_cumprod {schedule.alphas_cumprod[0].item():.6g} -> "
                                 f"{schedule.alphas_cumprod[-1].item():.6g}")
            schedule = cls.from_alphas_cumprod(_rescale_zero_terminal_snr(schedule.alphas_cumprod),
                                               prediction_type=prediction_type)
        return schedule

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        return self.one_minus_alphas_cumprod.sqrt()

    @property
    def snr(self) -> Tensor:
        """abar / (1 - abar); inf where abar rounded to 1, 0 at zero terminal SNR."""
        return self.alphas_cumprod / self.one_minus_alphas_cumprod

    def log_snr(self, t: Optional[Tensor] = None) -> Tensor:
        """log SNR in float64, with explicit +-inf limits (never NaN): per sample at integer steps ``t`` (on
        ``t``'s device), or the whole table ``[T]`` (CPU) without ``t``."""
        if t is None:
            return self._log_snr_table
        return self.gather("_log_snr_table", t, torch.float64, caller="log_snr")

    @property
    def _log_snr_table(self) -> Tensor:
        return torch.log(self.alphas_cumprod) - torch.log(self.one_minus_alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """The VE-equivalent noise level sqrt((1 - abar) / abar) (inf at zero terminal SNR)."""
        return (self.one_minus_alphas_cumprod / self.alphas_cumprod).sqrt()

    @property
    def vlb_weight(self) -> Tensor:
        """DDPM's VLB weight lambda_t = beta_t / (2 alpha_t (1 - abar_t)) (sigma_t^2 = beta_t).

        It scales the epsilon mismatch ``delta_t = lambda_t ||eps_hat - eps||^2`` (docs/DESIGN.md, Divergences):
        0.5 at t = 0, about 0.010 at t = 100 for the linear schedule. beta is capped at 0.999 (the
        iDDPM cap) so zero terminal SNR stays finite, and steps whose ``1 - abar`` rounded to 0 take
        the t = 0 limit ``1 / (2 alpha_t)``.
        """
        betas = self.betas.clamp(max=0.999)
        alphas = 1.0 - betas
        one_minus = self.one_minus_alphas_cumprod
        ratio = torch.where(one_minus > 0, betas / one_minus.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.ones_like(betas))
        return ratio / (2.0 * alphas)

    # ------------------------------------------------------------------ per-sample lookups
    def gather(self, name: str, t: Tensor, dtype: torch.dtype = torch.float32, *, caller: Optional[str] = None
               ) -> Tensor:
        """``getattr(self, name)[t]`` on ``t``'s device, cast to ``dtype`` after the float64 lookup.

        The table is copied to each device once and cached, so a training step has no host round-trip.
        ``caller`` names the public function in the error messages of :meth:`check_timesteps`.
        """
        t = self.check_timesteps(t, caller=caller)
        return self._on_device(name, t.device, dtype)[t]

    def check_timesteps(self, t: Tensor, argument: str = "t", *, caller: Optional[str] = None) -> Tensor:
        """Validate integer timesteps in [0, T). The range check needs no sync: on CPU it raises at
        once; on an accelerator and under torch.compile (where a negative index would silently wrap) it is an
        asynchronous device assertion. Messages name ``argument`` and,
        when given, the public function ``caller`` that received it (``"hellinger_loss: t must ..."``)."""
        where = f"{caller}: {argument}" if caller else argument
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} must be a tensor of integer timesteps, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{where} must hold integer timesteps (int32/int64), got dtype {t.dtype}"
                            + (" (t.long() converts it)" if not (t.dtype.is_floating_point or t.dtype.is_complex)
                               else ""))
        if t.dim() != 1:
            raise ValueError(f"{where} must be a 1-D tensor of per-sample timesteps, got shape {tuple(t.shape)}")
        if t.numel() == 0 or t.device.type == "meta":  # no values to check
            return t
        steps = self.num_timesteps
        expected = f"{where} must lie in [0, {steps}) (the step indices of this NoiseSchedule, T = {steps})"
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            if int(t.min()) < 0 or int(t.max()) >= steps:
                raise ValueError(f"{expected}, got values in [{int(t.min())}, {int(t.max())}]")
        else:
            torch._assert_async(((t >= 0) & (t < steps)).all(), expected)
        return t

    def coefficients(self, t: Tensor, dtype: torch.dtype = torch.float32, *, caller: Optional[str] = None
                     ) -> Tuple[Optional[Tensor], Tensor]:
        """Per-sample ``(sqrt(abar_t), sqrt(1 - abar_t))``: exactly the values :meth:`q_sample` uses."""
        return (self.gather("sqrt_alphas_cumprod", t, dtype=dtype, caller=caller),
                self.gather("sqrt_one_minus_alphas_cumprod", t, dtype=dtype, caller=caller))

    def lower_time_bound(self, q: Tensor) -> Tensor:
        """The smallest step with ``SNR_t q < 1`` (``T`` when none has), by ``searchsorted`` on ``-log SNR``
        (non-decreasing in t); 0 where ``q = 0``."""
        keys = self._on_device("_negative_log_snr_table", q.device, torch.float64)
        # SNR_t q < 1  <=>  -log SNR_t > log q: the first step past every key <= log q. q = 0 fits every step.
        first = torch.searchsorted(keys, torch.log(q), right=True)
        return torch.where(q > 0, first, torch.zeros_like(first))

    @property
    def _negative_log_snr_table(self) -> Tensor:
        return -self._log_snr_table

    def has_time_after(self, bound: Tensor) -> Tensor:
        return bound < self.num_timesteps

    def sample_timesteps_above(self, lower: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Integers uniform on ``[lower, T)`` (int64), drawn as ``lower + floor(u (T - lower))``: at ``lower = 0``
        the draw of :meth:`sample_timesteps` bit for bit."""
        steps = self.num_timesteps
        u = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=torch.float64)
        return (lower + torch.floor(u * (steps - lower).double()).long()).clamp(max=steps - 1)

    def min_snr(self) -> float:
        return float(self.snr[-1])

    def _on_device(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``getattr(self, name)`` on ``device`` as ``dtype``, copied once and cached (no per-step host copy)."""
        key = (name, device, dtype)
        table = self._device_cache.get(key)
        if table is None:
            table = getattr(self, name).to(device=device, dtype=dtype)
            self._device_cache[key] = table
        return table

    def _coefficient(self, name: str, t: Tensor, like: Tensor, caller: str) -> Tensor:
        coef = self.gather(name, t, dtype=torch.promote_types(like.dtype, torch.float32), caller=caller)
        return coef.reshape(-1, *([1] * (like.dim() - 1)))

    # ------------------------------------------------------------------ forward process
    def sample_timesteps(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Uniform integer timesteps in [0, T) (int64), drawn as ``floor(u T)`` with float64 ``u ~ U[0, 1)``.

        This is the draw of :func:`robust_diffusion.risk.sample_timesteps` (``t_min + floor(u (T - t_min))``)
        and of the trainer at ``t_min = 0``: with the same generator, clean (r = 0) samples get the same
        timesteps bit for bit whichever sampler is used.
        """
        check_count("NoiseSchedule.sample_timesteps: batch_size", batch_size, lowest=0)
        u = torch.rand(batch_size, device=device, dtype=torch.float64, generator=generator)
        return torch.floor(u * self.num_timesteps).long()

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``v = sqrt(abar) eps - sqrt(1 - abar) x0``."""
        _check_batch(x0, t)
        a = self._coefficient("sqrt_alphas_cumprod", t, x0, "NoiseSchedule.velocity")
        s = self._coefficient("sqrt_one_minus_alphas_cumprod", t, x0, "NoiseSchedule.velocity")
        return (a * noise - s * x0).to(x0.dtype)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_timesteps}, abar[0]={self.alphas_cumprod[0].item():.6g}, "
                f"abar[T-1]={self.alphas_cumprod[-1].item():.6g}, prediction_type={self.prediction_type!r})")


def check_count(name: str, value: object, lowest: int = 1) -> int:
    """``value`` as an int of at least ``lowest``, or a one-line error naming ``name``; a schedule or scheduler
    passed where a count belongs (``num_timesteps=schedule``) is told to pass its ``num_timesteps``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(lowest, f"an integer of at least {lowest}")
        if isinstance(value, Schedule) or hasattr(getattr(value, "config", None), "num_train_timesteps"):
            steps = (": pass its number of steps (schedule.num_timesteps, scheduler.config.num_train_timesteps)"
                     if name.endswith("timesteps") else "")
            raise TypeError(f"{name} must be {what}, got a {type(value).__name__}{steps}")
        shown = repr(value) if isinstance(value, (numbers.Number, str)) else f"a {type(value).__name__}"
        raise ValueError(f"{name} must be {what}, got {shown}")
    return int(value)


def _check_steps(num_timesteps: int) -> None:
    check_count("num_timesteps", num_timesteps)


def _check_batch(x: Tensor, t: Tensor) -> None:
    if x.dim() < 1 or t.dim() != 1 or x.shape[0] != t.shape[0]:
        raise ValueError(f"t must have one timestep per sample: x has batch {tuple(x.shape[:1])}, "
                         f"t has shape {tuple(t.shape)}")


def _rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2023: shift and scale sqrt(abar) so the last step has SNR exactly 0."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2
