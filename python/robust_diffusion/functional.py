"""The functional API: robust replacements for the MSE denoising loss.

Every loss has one shape (docs/DESIGN.md, Losses). For a batch of B samples with D elements each::

    R_b    = sum_i e(input_bi - target_bi)         (mean over i with dim_reduction="mean")
    loss_b = weight_b * phi(scale_b * R_b)
    out    = mean_b / sum_b / none of loss_b

``e`` is r^2 for the divergence losses and ``phi`` the transform induced by the f-divergence; its
derivative w = phi' is the per-sample *influence weight* (1 for a typical sample, -> 0 for an outlier
under the bounded divergences). Gradients flow to ``input`` (and ``target`` if it requires grad);
``scale``, ``weight`` and ``c`` are constants.

The default scale
-----------------
``scale=1.0`` with ``dim_reduction="mean"``: delta_b is the sample's mean squared error. Then
:func:`kl_loss` equals ``F.mse_loss`` exactly (the paper's "standard MSE" baseline) and every divergence
is a drop-in replacement for it whose influence weight falls as a sample's per-element MSE grows. It is
D- and t-independent and so predictable, but it is not the most robust choice: the adaptive scale of
:class:`robust_diffusion.RobustDiffusionLoss` flags contaminated samples better and trains better models
(docs/RESULTS.md). It stays the default because a stateless function cannot keep running statistics and because
it keeps ``kl_loss == F.mse_loss``; for robust training use the module. ``scale="vlb"`` gives DDPM's exact
lambda_t (use it with ``dim_reduction="sum"``); a float is a temperature 1 / (2 tau); a [B] tensor is used as is. The adaptive
per-timestep scale lives in :class:`robust_diffusion.RobustDiffusionLoss` (it needs running state).

Dtypes
------
``input`` and ``target`` are float32, float64, float16 or bfloat16 (anything else raises, naming the
argument). The same dtype, or a float16/bfloat16 input with a float32 target (an autocast model output
against float32 noise), is read as it is; any other mix is promoted as ``torch.promote_types`` says, as
``F.mse_loss`` does. Accumulation is float32 (float64 for float64 data); per-sample outputs are float32
(float64 for float64 data); the input gradient has the input's dtype.

Non-finite inputs
-----------------
They are not checked (that would cost a pass over the data and a host sync): the formulas are evaluated as
they stand, as PyTorch's own losses do, and a bad element only affects its own sample; every other sample's
loss, influence weight and gradient stay as they were. For sample b (measured, and tested in
tests/test_losses.py):

- NaN in input or target: the sample's loss, penalty R_b, influence w_b and its whole input gradient are NaN,
  so a "mean" or "sum" batch loss is NaN.
- A residual of +-inf makes R_b = inf, so delta_b = scale_b R_b = inf (NaN if scale_b = 0). Then:

  - ``kl_loss``: loss inf; gradient +-inf at that element, finite at the sample's others.
  - ``huber_loss``: loss inf; gradient finite everywhere (+-delta weight_b scale_b at the element, / D for
    ``dim_reduction="mean"``), as ``F.huber_loss``.
  - ``pseudo_huber_loss``: loss inf; gradient NaN at the element (r / sqrt(r^2 + c^2) = inf / inf), finite at
    the sample's others.
  - the bounded divergences (``hellinger``, ``ned``, ``alpha``, ``js``, ``lecam``, ``tv``) and
    ``clipped_mse_loss(mode="sample")``: a *finite* loss, weight_b times sup phi (4, e - 1, 1 / kappa,
    4 ln 2, 2, 1; tau), and w_b = 0: the sample's other elements get gradient 0 and the inf element NaN
    (0 * inf). The batch loss stays finite, but the NaN reaches every parameter gradient through backward.
  - ``chi2_loss``: delta saturates at 44: finite loss weight_b (exp(88) - 1) / 2, w_b = exp(88); gradient
    +-inf at the element and finite (huge) at the sample's others.
  - ``clipped_mse_loss(mode="element")``: the residual is clamped to +-tau: finite loss, gradient 0 there.

Filter non-finite samples (e.g. with ``torch.isfinite``) before the loss if they can occur.

Argument values: ``scale`` and ``weight`` must be non-negative and finite, ``c`` positive and finite. That is
checked on the CPU (a ValueError naming the argument); on an accelerator it would cost a host sync per call, so
there a bad value gives NaN or inf outputs instead. Shapes, dtypes, devices and the string arguments are checked
on every device and while tracing (torch.compile, torch.export, meta and fake tensors), with the same messages.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .continuous import as_schedule
from .schedules import NoiseSchedule, Schedule
from .weighting import pseudo_huber_c

__all__ = [
    "DIVERGENCES", "divergence_loss", "influence_weights",
    "kl_loss", "hellinger_loss", "ned_loss", "alpha_loss", "js_loss", "lecam_loss", "tv_loss", "chi2_loss",
    "huber_loss", "pseudo_huber_loss", "clipped_mse_loss", "default_schedule", "batch_scale", "PENALTY_FLOOR",
    "BATCH_SCALE_NEIGHBOURS",
]

Scale = Union[float, str, Tensor]

#: The f-divergences with an operator, by the name :func:`divergence_loss` takes.
DIVERGENCES = tuple(entry.name for entry in ops.LOSS_TABLE if entry.kind == "divergence")
_SCALE_PRESETS = ("vlb", "batch")
#: A typical penalty below this carries no scale information (a zero residual); scales never divide by less.
PENALTY_FLOOR = 1e-12
#: scale="batch": the typical penalty of a sample is the median over at least this many samples nearest to
#: it in t (a quarter of the batch when that is more); a batch this small or smaller uses its overall median.
BATCH_SCALE_NEIGHBOURS = 8

_DEFAULT_SCHEDULE: Optional[NoiseSchedule] = None


def default_schedule() -> NoiseSchedule:
    """The schedule used when none is given: DDPM's linear 1e-4 -> 0.02 over 1000 steps."""
    global _DEFAULT_SCHEDULE
    if _DEFAULT_SCHEDULE is None:
        _DEFAULT_SCHEDULE = NoiseSchedule.linear()
    return _DEFAULT_SCHEDULE


def _schedule(schedule: object, caller: str) -> Schedule:
    """The schedule a function was given (a diffusers scheduler mapped), or the default one."""
    return default_schedule() if schedule is None else as_schedule(schedule, caller)


def check_tensor(caller: str, argument: str, value: object) -> Tensor:
    """``value`` if it is a tensor, else a one-line TypeError naming ``argument`` and the fix: a diffusers model
    output (``UNet2DOutput`` and the like) is told to pass its ``.sample``, a list or number to make a tensor."""
    if isinstance(value, Tensor):
        return value
    if isinstance(getattr(value, "sample", None), Tensor):
        raise TypeError(f"{caller}: {argument} is a {type(value).__name__} (a diffusers model output): pass its "
                        f".sample")
    fix = " (torch.as_tensor(t, device=input.device))" if argument == "t" else ""
    raise TypeError(f"{caller}: {argument} must be a tensor, got {type(value).__name__}{fix}")


def _check_pair(name: str, input: Tensor, target: Tensor) -> int:
    check_tensor(name, "input", input)
    check_tensor(name, "target", target)
    if input.dim() < 1:
        raise ValueError(f"{name}: input must have a leading batch dimension, got a 0-dim tensor")
    if input.shape != target.shape:
        raise ValueError(f"{name}: target must have the shape of input {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    return input.shape[0]


def _per_sample(name: str, argument: str, value: Union[float, Tensor], batch: int, device: torch.device) -> Tensor:
    """A float or a 0-dim / [B] tensor as a [B] tensor on ``device``."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return value.to(device).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name}: {argument} must be a float or have one value per sample, shape [{batch}], "
                             f"got shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {argument} must be a float or a tensor, got {type(value).__name__}")
    return torch.full((batch,), float(value), device=device)


def _resolve_scale(name: str, scale: Scale, t: Optional[Tensor], schedule: Optional[NoiseSchedule],
                   batch: int, device: torch.device) -> Tensor:
    if isinstance(scale, str):
        if scale not in _SCALE_PRESETS:
            raise ValueError(f"{name}: scale must be a float, a per-sample tensor or one of {_SCALE_PRESETS}, "
                             f"got {scale!r} (the adaptive scale needs running state: use RobustDiffusionLoss)")
        if t is None:
            raise ValueError(f"{name}: scale='vlb' needs the timesteps t")
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"{name}: scale='vlb' is DDPM's lambda_t of a discrete schedule; {schedule!r} is "
                             f"continuous (use a number, 'batch' or RobustDiffusionLoss's adaptive scale)")
        return schedule.gather("vlb_weight", t, caller=name)
    if not isinstance(scale, Tensor):
        scale = _float_param(name, "scale", scale, "a float, a per-sample tensor or 'vlb'")
        if not 0 <= scale < math.inf:  # also refuses NaN
            raise ValueError(f"{name}: scale must be non-negative and finite, got {scale!r}")
    return _per_sample(name, "scale", scale, batch, device)


def batch_scale(penalty: Tensor, t: Optional[Tensor] = None, temperature: float = 1.0,
                neighbours: int = BATCH_SCALE_NEIGHBOURS, floor: float = PENALTY_FLOOR) -> Tensor:
    """The stateless scale (docs/DESIGN.md, Scale): ``1 / (temperature * m_b)`` per sample, where ``m_b`` is the
    median penalty of the ``k`` samples of this batch nearest to sample b in ``t`` (nearest in noise level, as
    log-SNR is monotone in t), ``k = max(neighbours, B // 4)`` (the whole batch when B is not
    larger; without ``t`` the whole batch). A median ignores up to half of its window, so contaminated
    samples do not set the scale unless they are the majority at their noise level. Non-finite penalties are
    left out of the medians; a window with none finite gives scale 1. No gradient, no state, no host sync."""
    batch = penalty.shape[0]
    values = penalty.detach().float()
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))
    if t is None:
        order = torch.arange(batch, device=values.device)
    else:
        order = torch.argsort(t, stable=True)
    k = min(batch, max(neighbours, batch // 4))
    window_medians = torch.nanmedian(values[order].unfold(0, k, 1), dim=1).values  # [B - k + 1]
    start = (torch.arange(batch, device=values.device) - k // 2).clamp(0, batch - k)  # the window centred on b
    typical = torch.empty_like(values)
    typical[order] = window_medians[start]
    typical = torch.where(torch.isnan(typical), torch.ones_like(typical), typical).clamp_min(floor)
    return 1.0 / (temperature * typical)


def _float_param(name: str, argument: str, value, expected: str = "a float") -> float:
    """A Python number as a float, or a TypeError that names the argument (not float()'s message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {argument} must be {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def _loss_call(op_name: str, input: Tensor, target: Tensor, t: Optional[Tensor], schedule: Optional[NoiseSchedule],
               scale: Scale, dim_reduction: str, weight: Optional[Tensor], reduction: str,
               *params) -> Tuple[Tensor, Tensor, Tensor]:
    """Validates the Python-level arguments and calls ``torch.ops.robust_diffusion.<op_name>``."""
    batch = _check_pair(op_name, input, target)
    schedule = _schedule(schedule, op_name)
    if t is not None:
        check_tensor(op_name, "t", t)
        if t.dim() != 1 or t.shape[0] != batch:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op_name}: t must be a 1-D tensor with one timestep per sample ({batch}), got {shape}")
        if t.device != input.device:
            raise ValueError(f"{op_name}: t must be on input's device ({input.device}), got {t.device}")
        schedule.check_timesteps(t, caller=op_name)
    op = getattr(torch.ops.robust_diffusion, op_name)
    if isinstance(scale, str) and scale == "batch":
        with torch.no_grad():  # one extra pass: the penalties at scale 1, for their medians
            ones = torch.ones(batch, device=input.device)
            penalty = op(input.detach(), target.detach(), ones, None, dim_reduction, "none", *params)[1]
        scale_b = batch_scale(penalty, t)
    else:
        scale_b = _resolve_scale(op_name, scale, t, schedule, batch, input.device)
    if weight is not None:
        weight = _per_sample(op_name, "weight", weight, batch, input.device)
    return op(input, target, scale_b, weight, dim_reduction, reduction, *params)


_COMMON_DOC = """
    Args:
        input: the model output, shape [B, ...] (float32/float64/float16/bfloat16).
        target: what it should predict (e.g. the noise), the same shape; float32 with a low-precision
            input is read as is.
        t: integer timesteps [B]; needed for ``scale="vlb"``, validated when given.
        schedule: the schedule of ``t`` (default: linear :class:`NoiseSchedule`, T = 1000), or a diffusers scheduler
            as it is (:func:`~robust_diffusion.schedule_from_diffusers`).
        scale: multiplies R_b before the transform: a float (default 1.0), a [B] tensor, ``"vlb"``, or
            ``"batch"`` (stateless robust scale from this batch's penalties, :func:`batch_scale`).
        dim_reduction: ``"mean"`` (default) or ``"sum"`` of the penalty over a sample's elements.
        weight: optional per-sample weight [B] (e.g. :func:`robust_diffusion.loss_weights`).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the per-sample float32 vector).
    """


def _divergence(op_name: str, input, target, t, schedule, scale, dim_reduction, weight, reduction, *params) -> Tensor:
    return _loss_call(op_name, input, target, t, schedule, scale, dim_reduction, weight, reduction, *params)[0]


def kl_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, schedule: Optional[NoiseSchedule] = None,
            scale: Scale = 1.0, dim_reduction: str = "mean", weight: Optional[Tensor] = None,
            reduction: str = "mean") -> Tensor:
    """KL (= the plain MSE): phi(delta) = delta, w = 1. With the defaults it equals ``F.mse_loss``."""
    return _divergence("kl_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def hellinger_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *,
                   schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
                   weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Squared Hellinger: phi = 4 (1 - exp(-delta / 4)), w = exp(-delta / 4); bounded by 4."""
    return _divergence("hellinger_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def ned_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, schedule: Optional[NoiseSchedule] = None,
             scale: Scale = 1.0, dim_reduction: str = "mean", weight: Optional[Tensor] = None,
             reduction: str = "mean") -> Tensor:
    """Negative exponential disparity: bounded by e - 1, the fastest down-weighting of outliers."""
    return _divergence("ned_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def alpha_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, alpha: float,
               schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
               weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Alpha-divergence, 0 < alpha < 1: phi = (1 - exp(-k delta)) / k with k = alpha (1 - alpha).

    alpha = 1/2 is exactly Hellinger (the most aggressive member); alpha -> 0 or 1 approaches KL.
    """
    return _divergence("alpha_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction,
                       _float_param("alpha_loss", "alpha", alpha, "a float in (0, 1)"))


def js_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, schedule: Optional[NoiseSchedule] = None,
            scale: Scale = 1.0, dim_reduction: str = "mean", weight: Optional[Tensor] = None,
            reduction: str = "mean") -> Tensor:
    """Jensen-Shannon (x4, so w(0) = 1): bounded by 4 ln 2."""
    return _divergence("js_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def lecam_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *,
               schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
               weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Le Cam: f(u) = (u - 1)^2 / (u + 1), bounded by 2."""
    return _divergence("lecam_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def tv_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, schedule: Optional[NoiseSchedule] = None,
            scale: Scale = 1.0, dim_reduction: str = "mean", weight: Optional[Tensor] = None,
            reduction: str = "mean") -> Tensor:
    """Total variation: phi = erf(sqrt(delta) / 2). w is unbounded at delta = 0, where it is defined as 0
    (the minimum-norm subgradient; the residual is zero there)."""
    return _divergence("tv_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def chi2_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, schedule: Optional[NoiseSchedule] = None,
              scale: Scale = 1.0, dim_reduction: str = "mean", weight: Optional[Tensor] = None,
              reduction: str = "mean") -> Tensor:
    """Pearson chi^2 / 2: phi = (exp(2 delta) - 1) / 2, w = exp(2 delta). Anti-robust (it amplifies
    outliers), for comparison only. delta saturates at 44 so the float32 loss and influence outputs stay
    finite (beyond it phi = (exp(88) - 1) / 2 and w = exp(88)); the gradient, w times the MSE gradient, can
    still overflow float32 there (to +-inf)."""
    return _divergence("chi2_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction)


def huber_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, delta: float = 1.0,
               schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
               weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """PyTorch's Huber per element (0.5 r^2 for |r| <= delta, else delta (|r| - delta / 2)); with the
    defaults it equals ``F.huber_loss``."""
    return _divergence("huber_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction,
                       _float_param("huber_loss", "delta", delta))


def pseudo_huber_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, c: Union[float, Tensor] = 0.1,
                      c_schedule: Optional[str] = None, c_scale: float = 1.0, form: str = "huber",
                      schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
                      weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """diffusers' pseudo-Huber: ``form="huber"`` is 2c (sqrt(r^2 + c^2) - c), ``form="smooth_l1"`` is
    2 (sqrt(r^2 + c^2) - c). ``c`` is a float or a per-sample tensor [B]. With ``c_schedule`` (diffusers'
    ``huber_schedule``: ``"constant"``, ``"exponential"`` or ``"snr"``, its default) the float ``c`` is
    turned into per-sample values from ``t`` on the device (:func:`robust_diffusion.pseudo_huber_c`);
    ``c_scale`` is kohya's ``huber_scale`` (constant and exponential schedules only, as there)."""
    batch = _check_pair("pseudo_huber_loss", input, target)
    if not isinstance(c, Tensor) and not (isinstance(c, (int, float)) and c > 0):
        raise ValueError(f"pseudo_huber_loss: c must be positive, got {c!r}")
    if c_schedule is not None:
        if t is None or isinstance(c, Tensor):
            raise ValueError("pseudo_huber_loss: c_schedule needs the timesteps t and a float c")
        schedule = _schedule(schedule, "pseudo_huber_loss")
        c = pseudo_huber_c(schedule, t, float(c), c_schedule, c_scale)
    elif c_scale != 1.0:
        raise ValueError("pseudo_huber_loss: c_scale scales a c_schedule; without one, pass c * c_scale as c")
    c_b = _per_sample("pseudo_huber_loss", "c", c, batch, input.device)
    return _divergence("pseudo_huber_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction,
                       c_b, form)


def clipped_mse_loss(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, tau: float, mode: str = "sample",
                     schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
                     weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Clipped MSE. ``mode="sample"``: min(MSE_b, tau) per sample (zero gradient above tau);
    ``mode="element"``: each residual clamped to [-tau, tau] before squaring."""
    return _divergence("clipped_mse_loss", input, target, t, schedule, scale, dim_reduction, weight, reduction,
                       _float_param("clipped_mse_loss", "tau", tau), mode)


for _name in ops.LOSS_OPS:  # every loss has its function here, named like its operator
    globals()[_name].__doc__ += _COMMON_DOC

_DIVERGENCE_FUNCTIONS = {name: globals()[f"{name}_loss"] for name in DIVERGENCES}


def divergence_loss(divergence: str, input: Tensor, target: Tensor, t: Optional[Tensor] = None,
                    **kwargs) -> Tensor:
    """The loss of the f-divergence named ``divergence`` (one of :data:`DIVERGENCES`)."""
    try:
        fn = _DIVERGENCE_FUNCTIONS[divergence]
    except KeyError:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}") from None
    return fn(input, target, t, **kwargs)


def influence_weights(input: Tensor, target: Tensor, t: Optional[Tensor] = None, *, divergence: str = "hellinger",
                      schedule: Optional[NoiseSchedule] = None, scale: Scale = 1.0, dim_reduction: str = "mean",
                      weight: Optional[Tensor] = None, reduction: str = "mean",
                      alpha: Optional[float] = None) -> Tensor:
    """The per-sample influence weight w(scale_b R_b) [B] that ``<divergence>_loss`` applies to each
    sample's gradient (1 = full weight, 0 = ignored), float32 (float64 for float64 inputs); no gradient.

    It takes the arguments of the losses, so a loss call's keyword arguments can be passed on unchanged.
    ``weight`` and ``reduction`` are validated as there but do not change w: the weight multiplies the
    sample's loss after phi, and the batch reduction comes after that, so the result is always the
    per-sample vector of w(delta_b). ``alpha`` is required for ``divergence="alpha"`` (and only for it).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if (alpha is None) != (divergence != "alpha"):
        raise ValueError("influence_weights: alpha is required for divergence='alpha' and only for it")
    params = (_float_param("influence_weights", "alpha", alpha, "a float in (0, 1)"),) if divergence == "alpha" else ()
    with torch.no_grad():
        return _loss_call(f"{divergence}_loss", input.detach(), target.detach(), t, schedule, scale, dim_reduction,
                          weight, reduction, *params)[2]
