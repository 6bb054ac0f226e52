"""Per-timestep loss weights and pseudo-Huber ``c`` schedules (docs/DESIGN.md, Baselines and Weighting).

Every weighting scheme is defined once, as an epsilon-space weight ``w_eps(lambda)`` of the log
signal-to-noise ratio ``lambda = log SNR_t``, and converted to the parameterisation whose loss it
multiplies::

    w_x0 = w_eps * exp(lambda)        (MSE_x0 = MSE_eps / SNR)
    w_v  = w_eps * sigmoid(lambda)    (MSE_v  = MSE_eps (SNR + 1) / SNR)
    w_flow = w_eps * sigmoid(lambda / 2)^2   (flow matching: MSE_flow = MSE_eps / (1 - t)^2, 1 - t = sigmoid(lambda / 2))

so ``w_x0 * MSE_x0 == w_v * MSE_v == w_eps * MSE_eps`` for the same model error. For example
``min_snr`` in v-space is ``min(SNR, gamma) / (SNR + 1)``, the weight of diffusers' training scripts.
Weights are evaluated in float64 and in log space (no overflow for large ``|lambda|``) and cast to
the requested dtype at the end.

Non-finite log-SNR (``+inf`` where a stored ``alphas_cumprod`` rounded to 1, e.g. fp16/bf16;
``-inf`` at zero terminal SNR) follows an explicit ``terminal`` policy; no weight is ever NaN or inf:

- ``"clamp"`` (default): lambda is clamped to the schedule's finite range, so a step with
  ``lambda = -inf`` gets the weight of the step with the smallest finite lambda (its neighbour
  ``T - 2`` at zero terminal SNR) and ``lambda = +inf`` that of the largest. Where the exact limit
  is finite (e.g. min-SNR in v-space tends to 0) the clamped weight is close to it; where it is
  infinite (debias in epsilon space) the weight stays bounded.
- ``"one"``: weight exactly 1 (in the requested parameterisation) at non-finite lambda.

In both policies lambda is also clamped to ``[-LOG_SNR_BOUND, LOG_SNR_BOUND]`` (30, i.e. SNR
between 1e-13 and 1e13). No practical schedule reaches it (linear: [-10.1, 9.2], cosine:
[-19.8, 10.1]); it bounds the weights of degenerate float64 schedules. Casting to a dtype that
cannot hold a weight (e.g. fp16 above 65504) saturates at that dtype's largest finite value.

On a discrete schedule, weights are looked up from a table of T values computed once per (schedule, scheme,
parameters, prediction type, terminal policy, normalisation) and copied once per device and dtype: a training
step only indexes a cached device tensor (no host round-trip, no float64 work). On a continuous schedule (flow
matching, continuous VP, VE, EDM) the same evaluation runs at ``schedule.log_snr(t)`` on each call, with lambda
bounded to ``[-LOG_SNR_BOUND, LOG_SNR_BOUND]`` (so t = 0 and t = 1 of flow matching get finite weights). Weights and ``c``
are constants with respect to the model: no gradient flows through them.

The table build is plain tensor code without host syncs, so ``torch.compile(fullgraph=True)`` traces
it when a compiled step meets a cold cache; the table that step computes is cached as in eager mode,
and later traces index it as a constant.
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .continuous import as_schedule
from .schedules import NoiseSchedule, Schedule, canonical_prediction_type, prediction_type_for

__all__ = ["loss_weights", "weight_table", "pseudo_huber_c",
           "WEIGHTING_SCHEMES", "TERMINAL_POLICIES", "HUBER_C_SCHEDULES", "LOG_SNR_BOUND"]

LOG_SNR_BOUND = 30.0
TERMINAL_POLICIES = ("clamp", "one")
HUBER_C_SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class _Param:
    default: Optional[float]        # None: the caller must pass it
    minimum: Optional[float] = None  # None: any finite real
    strict: bool = True             # value > minimum (True) or >= minimum (False)


@dataclass(frozen=True)
class _Scheme:
    log_weight: Callable[[Tensor, Mapping[str, float]], Tensor]  # log w_eps of a finite float64 lambda
    params: Mapping[str, _Param] = field(default_factory=dict)


def _log1p_exp(x: Tensor) -> Tensor:
    return torch.logaddexp(torch.zeros_like(x), x)


# docs/DESIGN.md, Weighting, as log w_eps(lambda). SNR = exp(lambda).
_SCHEMES: Dict[str, _Scheme] = {
    # 1
    "constant": _Scheme(lambda lam, p: torch.zeros_like(lam)),
    # 1 / sqrt(SNR)  [DEBIAS]
    "debias": _Scheme(lambda lam, p: -0.5 * lam),
    # min(1, gamma / SNR)  [MINSNR]
    "min_snr": _Scheme(lambda lam, p: (math.log(p["gamma"]) - lam).clamp(max=0.0),
                       {"gamma": _Param(5.0, 0.0)}),
    # (k + SNR)^-gamma  [P2]
    "p2": _Scheme(lambda lam, p: -p["gamma"] * torch.logaddexp(torch.full_like(lam, math.log(p["k"])), lam),
                  {"k": _Param(1.0, 0.0), "gamma": _Param(1.0, 0.0, strict=False)}),
    # gamma / (gamma + SNR), gamma = 1 / sigma_data^2 (Crowson et al.)
    "soft_min_snr": _Scheme(lambda lam, p: F.logsigmoid(math.log(p["gamma"]) - lam),
                            {"gamma": _Param(4.0, 0.0)}),
    # sigmoid(b - lambda) (Kingma & Gao)
    "sigmoid": _Scheme(lambda lam, p: F.logsigmoid(p["b"] - lam), {"b": _Param(0.0)}),
    # 1 + 1 / (SNR sigma_data^2)  [EDM]
    "edm": _Scheme(lambda lam, p: _log1p_exp(-lam - 2.0 * math.log(p["sigma_data"])),
                   {"sigma_data": _Param(0.5, 0.0)}),
    # max(1, 1 / SNR): x0-space max(SNR, 1)
    "trunc_snr": _Scheme(lambda lam, p: (-lam).clamp(min=0.0)),
    # max(1, k / SNR): x0-space max(SNR, k)
    "max_snr": _Scheme(lambda lam, p: (math.log(p["k"]) - lam).clamp(min=0.0), {"k": _Param(None, 0.0)}),
    # 1 / SNR: x0-space constant
    "inv_snr": _Scheme(lambda lam, p: -lam),
    # SD3's flow-matching weightings (diffusers' compute_loss_weighting_for_sd3), defined on the flow sigma
    # s = sigmoid(-lambda / 2) in flow space and stored here in epsilon space (w_eps = w_flow / (1 - s)^2):
    # sigma^-2, and cosmap 2 / (pi (1 - 2 s + 2 s^2)).
    "sigma_sqrt": _Scheme(lambda lam, p: -2.0 * (F.logsigmoid(-0.5 * lam) + F.logsigmoid(0.5 * lam))),
    "cosmap": _Scheme(lambda lam, p: math.log(2.0 / math.pi) - torch.log(
        torch.sigmoid(-0.5 * lam).square() + torch.sigmoid(0.5 * lam).square()) - 2.0 * F.logsigmoid(0.5 * lam)),
}
WEIGHTING_SCHEMES = tuple(_SCHEMES)

# Per-schedule caches: float64 CPU tables and their per-(device, dtype) copies. Weak keys so a
# schedule's tables die with it (schedules hash by identity).
_TABLES: "weakref.WeakKeyDictionary[NoiseSchedule, Dict[tuple, Tensor]]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------- public API
def loss_weights(schedule: NoiseSchedule, t: Tensor, scheme: str = "constant",
                 prediction_type: Optional[str] = None, *, terminal: str = "clamp", normalize: bool = False,
                 dtype: torch.dtype = torch.float32, **params: float) -> Tensor:
    """Per-sample timestep loss weights, shape ``[B]`` on ``t``'s device.

    Args:
        schedule: the noise schedule (``rd.schedule_from_diffusers(scheduler)`` for diffusers): a discrete
            :class:`NoiseSchedule` (weights looked up from a cached table) or a continuous
            :class:`~robust_diffusion.Schedule` such as :class:`~robust_diffusion.FlowMatchingSchedule` (weights
            computed from ``schedule.log_snr(t)`` at each call, log-SNR clamped to ``[-LOG_SNR_BOUND,
            LOG_SNR_BOUND]``, so every weight is finite at t = 0 and t = 1 too).
        t: integer timesteps in ``[0, T)`` (discrete) or the schedule's float times, shape ``[B]``.
        scheme: one of :data:`WEIGHTING_SCHEMES` (docs/DESIGN.md, Weighting).
        prediction_type: the parameterisation whose per-sample loss the weight multiplies:
            ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"`` (aliases ``eps``, ``x0``, ``v``; VP processes),
            or ``"flow_prediction"`` (alias ``flow``; flow-matching schedules); ``None`` uses the schedule's.
        terminal: ``"clamp"`` or ``"one"``: the weight at steps with infinite log-SNR (module docstring).
        normalize: divide by the mean weight over all T steps (after the terminal policy), so the
            average weight under uniform timestep sampling is 1 (discrete schedules only).
        dtype: floating dtype of the result; values beyond its range saturate.
        **params: the scheme's parameters: ``min_snr(gamma=5)``, ``p2(k=1, gamma=1)``,
            ``soft_min_snr(gamma=4)``, ``sigmoid(b=0)``, ``edm(sigma_data=0.5)``, ``max_snr(k)`` (required);
            ``sigma_sqrt`` and ``cosmap`` (SD3's flow-matching weightings) take none.

    Example: ``loss = (weights * per_sample_mse).mean()`` with
    ``weights = loss_weights(schedule, t, "min_snr", gamma=5.0)``.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    schedule = as_schedule(schedule, "loss_weights")
    if not schedule.discrete:
        return _continuous_weights(schedule, t, scheme, prediction_type, terminal, normalize, dtype, params)
    key = _weight_key(schedule, scheme, prediction_type, terminal, normalize, params)
    t = schedule.check_timesteps(t, caller="loss_weights")
    return _device_table(schedule, key, t.device, dtype)[t]


def weight_table(schedule: NoiseSchedule, scheme: str = "constant", prediction_type: Optional[str] = None, *,
                 terminal: str = "clamp", normalize: bool = False, **params: float) -> Tensor:
    """The weights of :func:`loss_weights` for every step: float64 CPU tensor of shape ``[T]`` (a copy)."""
    schedule = as_schedule(schedule, "weight_table")
    key = _weight_key(schedule, scheme, prediction_type, terminal, normalize, params)
    return _float64_table(schedule, key).clone()


def pseudo_huber_c(schedule: Schedule, t: Tensor, c: float = 0.1, c_schedule: str = "snr",
                   c_scale: float = 1.0) -> Tensor:
    """Per-sample pseudo-Huber ``c_b`` from the timestep: float32 ``[B]`` on ``t``'s device.

    The schedules of diffusers' scheduled-Huber research scripts [SPHL] (``huber_c``, ``huber_schedule``),
    with ``T = num_train_timesteps`` and ``t`` in ``[0, T)``:

    - ``"constant"``: ``c * c_scale``.
    - ``"exponential"``: ``exp(log(c) t / T) * c_scale = c^(t / T) * c_scale``: ``c_scale`` at ``t = 0``,
      ``c^((T-1)/T) c_scale`` at ``T - 1``.
    - ``"snr"`` (diffusers' default): ``(1 - c) / (1 + sigma_t)^2 + c`` with
      ``sigma_t = sqrt((1 - abar_t) / abar_t)``; evaluated as ``(1 - c) abar / (sqrt(abar) + sqrt(1 - abar))^2 + c``,
      which is the same value and gives the limit ``c`` at ``abar = 0`` (zero terminal SNR) without an inf.

    On a continuous schedule ``"snr"`` is the same function of the noise level, ``(1 - c) sigmoid(lambda / 2)^2 +
    c`` at ``lambda = schedule.log_snr(t)`` (``sigma_t / alpha_t = exp(-lambda / 2)``): 1 at no noise, ``c`` at
    pure noise, finite at both ends. For flow matching (``sigma / alpha = t / (1 - t)``) it is
    ``(1 - c) (1 - t)^2 + c``, which is what the snr schedule means there (kohya-ss/sd-scripts#1868: the
    DDPM formula fed flow times does not). ``"exponential"`` is ``c^t c_scale`` on the unit time of flow
    matching and of the continuous VP / VE processes, and is refused for EDM (its time is sigma itself).

    ``c_scale`` is kohya sd-scripts' ``huber_scale``, applied as there: to the constant and exponential
    schedules, not to ``"snr"``. diffusers' scripts have no such option (``c_scale = 1``).
    """
    schedule = as_schedule(schedule, "pseudo_huber_c")
    if schedule.discrete:
        _check_schedule(schedule)
    if c_schedule not in HUBER_C_SCHEDULES:
        raise ValueError(f"c_schedule must be one of {list(HUBER_C_SCHEDULES)}, got {c_schedule!r}")
    c = _check_number("c", c)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c!r}")
    c_scale = _check_number("c_scale", c_scale)
    if not c_scale > 0:
        raise ValueError(f"c_scale must be > 0, got {c_scale!r}")
    t = schedule.check_timesteps(t, caller="pseudo_huber_c")
    if schedule.discrete:
        return _device_table(schedule, ("huber_c", c_schedule, c, c_scale), t.device, torch.float32)[t]
    if c_schedule == "constant":
        return torch.full(t.shape, c * c_scale, dtype=torch.float32, device=t.device)
    if c_schedule == "exponential":
        if schedule.process == "edm":
            raise ValueError(f"pseudo_huber_c: c_schedule 'exponential' needs a time in [0, 1]; {schedule!r} is "
                             f"indexed by sigma (use 'snr' or 'constant')")
        return (c ** t.double() * c_scale).float()
    return ((1.0 - c) * torch.sigmoid(0.5 * schedule.log_snr(t)).square() + c).float()


# ---------------------------------------------------------------------------------- tables
def _continuous_weights(schedule: Schedule, t: Tensor, scheme: str, prediction_type: Optional[str], terminal: str,
                        normalize: bool, dtype: torch.dtype, params: Mapping[str, object]) -> Tensor:
    """:func:`loss_weights` on a continuous schedule: the scheme at ``schedule.log_snr(t)``, per call."""
    _scheme(scheme)
    if normalize:
        raise ValueError("loss_weights: normalize=True averages over the T steps of a discrete schedule; a continuous "
                         "schedule has none (normalise over your own timestep distribution)")
    kind = prediction_type_for(schedule, prediction_type, "loss_weights")
    resolved = _resolve_params(scheme, params)
    if terminal not in TERMINAL_POLICIES:
        raise ValueError(f"terminal must be one of {list(TERMINAL_POLICIES)}, got {terminal!r}")
    lam = schedule.log_snr(schedule.check_timesteps(t, caller="loss_weights"))
    bound = torch.tensor(LOG_SNR_BOUND, dtype=torch.float64, device=lam.device)
    weights = _weights_of_log_snr(lam, -bound, bound, scheme, resolved, kind, terminal)
    return weights.clamp(max=torch.finfo(dtype).max).to(dtype)  # saturate, never inf (no host sync per call)


def _scheme(scheme: object) -> _Scheme:
    spec = _SCHEMES.get(scheme) if isinstance(scheme, str) else None
    if spec is None:
        raise ValueError(f"scheme must be one of {list(WEIGHTING_SCHEMES)}, got {scheme!r}")
    return spec


def _resolve_params(scheme: str, params: Mapping[str, object]) -> Dict[str, float]:
    """The scheme's parameters, validated, with defaults filled in."""
    spec = _scheme(scheme)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        takes = f"parameters {sorted(spec.params)}" if spec.params else "no parameters"
        raise ValueError(f"unknown parameter(s) {unknown} for scheme {scheme!r}; it takes {takes}")
    resolved = {}
    for name, rule in spec.params.items():
        if name not in params and rule.default is None:
            raise ValueError(f"scheme {scheme!r} needs the parameter {name!r}")
        value = _check_number(name, params.get(name, rule.default))
        if rule.minimum is not None and not (value > rule.minimum if rule.strict else value >= rule.minimum):
            raise ValueError(f"{name} must be {'>' if rule.strict else '>='} {rule.minimum:g} "
                             f"for scheme {scheme!r}, got {value!r}")
        resolved[name] = value
    return resolved


def _weight_key(schedule: NoiseSchedule, scheme: str, prediction_type: Optional[str], terminal: str,
                normalize: bool, params: Mapping[str, object]) -> tuple:
    """Validate the arguments; return the hashable cache key that identifies the table."""
    _check_schedule(schedule)
    _scheme(scheme)
    kind = canonical_prediction_type(schedule.prediction_type if prediction_type is None else prediction_type)
    if terminal not in TERMINAL_POLICIES:
        raise ValueError(f"terminal must be one of {list(TERMINAL_POLICIES)}, got {terminal!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    resolved = _resolve_params(scheme, params)
    # Sorted by name alone: torch 2.11's dynamo cannot sort (name, value) pairs under dynamic=True.
    return ("weights", scheme, tuple((name, resolved[name]) for name in sorted(resolved)), kind, terminal, normalize)


def _float64_table(schedule: NoiseSchedule, key: tuple) -> Tensor:
    tables = _TABLES.setdefault(schedule, {})
    table = tables.get(key)
    if table is None:
        table = _build_table(schedule, key)
        tables[key] = table
    return table


def _device_table(schedule: NoiseSchedule, key: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    tables = _TABLES.setdefault(schedule, {})
    device_key = (key, device, dtype)
    table = tables.get(device_key)
    if table is None:
        table = _float64_table(schedule, key).clamp(max=torch.finfo(dtype).max).to(device=device, dtype=dtype)
        tables[device_key] = table
    return table


def _build_table(schedule: NoiseSchedule, key: tuple) -> Tensor:
    """The float64 CPU table of a key. No host sync (no ``.item()``, no data-dependent branch), so a
    compiled step that finds the cache cold traces it instead of breaking the graph."""
    if key[0] == "huber_c":
        return _huber_c_table(schedule, *key[1:])
    return _weights_table(schedule, *key[1:])


def _weights_table(schedule: NoiseSchedule, scheme: str, params: Tuple[Tuple[str, float], ...], kind: str,
                   terminal: str, normalize: bool) -> Tensor:
    lam = schedule.log_snr()
    weights = _weights_of_log_snr(lam, *_clamp_range(lam, torch.isfinite(lam)), scheme, dict(params), kind, terminal)
    if normalize:
        weights = weights / weights.mean()
    all_finite = torch.isfinite(weights).all()
    if torch.compiler.is_compiling():  # a traced build checks in the graph: no data-dependent branch
        torch._assert_async(all_finite, "timestep weights outside the float64 range on this schedule; "
                                        "choose less extreme weighting parameters")
    elif not all_finite:
        raise ValueError(f"scheme {scheme!r} with parameters {dict(params)} gives weights outside the float64 "
                         f"range on this schedule (normalize={normalize}); choose less extreme parameters")
    return weights


def _weights_of_log_snr(lam: Tensor, low: Tensor, high: Tensor, scheme: str, params: Mapping[str, float], kind: str,
                        terminal: str) -> Tensor:
    """The one evaluation of a scheme (float64): lambda clamped to ``[low, high]``, the epsilon-space weight, its
    conversion to ``kind``, and the terminal policy at non-finite lambda."""
    finite = torch.isfinite(lam)
    lam = torch.clamp(lam, low, high)
    log_w = _SCHEMES[scheme].log_weight(lam, params)
    if kind == "sample":
        log_w = log_w + lam
    elif kind == "v_prediction":
        log_w = log_w + F.logsigmoid(lam)
    elif kind == "flow_prediction":
        log_w = log_w + 2.0 * F.logsigmoid(0.5 * lam)
    weights = torch.exp(log_w)
    if terminal == "one":
        weights = torch.where(finite, weights, torch.ones_like(weights))
    return weights


def _clamp_range(lam: Tensor, finite: Tensor) -> Tuple[Tensor, Tensor]:
    """The schedule's finite log-SNR range, within [-LOG_SNR_BOUND, LOG_SNR_BOUND], as 0-dim tensors
    (no host sync); the whole bound when no step is finite."""
    any_finite = finite.any()
    low = torch.where(any_finite, lam.masked_fill(~finite, math.inf).amin(), -LOG_SNR_BOUND)
    high = torch.where(any_finite, lam.masked_fill(~finite, -math.inf).amax(), LOG_SNR_BOUND)
    return low.clamp(-LOG_SNR_BOUND, LOG_SNR_BOUND), high.clamp(-LOG_SNR_BOUND, LOG_SNR_BOUND)


def _huber_c_table(schedule: NoiseSchedule, c_schedule: str, c: float, c_scale: float) -> Tensor:
    steps = schedule.num_timesteps
    if c_schedule == "constant":
        return torch.full((steps,), c * c_scale, dtype=torch.float64)
    if c_schedule == "exponential":
        # diffusers: alpha = -log(c) / num_train_timesteps; c_t = exp(-alpha * t) (kohya: times huber_scale)
        alpha = -math.log(c) / steps
        return torch.exp(-alpha * torch.arange(steps, dtype=torch.float64)) * c_scale
    abar = schedule.alphas_cumprod
    inv_one_plus_sigma_sq = abar / (abar.sqrt() + schedule.one_minus_alphas_cumprod.sqrt()) ** 2
    return (1.0 - c) * inv_one_plus_sigma_sq + c


# ---------------------------------------------------------------------------------- checks
def _check_schedule(schedule: object) -> None:
    if not isinstance(schedule, NoiseSchedule):
        continuous = (" (a continuous schedule has no table of T steps: evaluate loss_weights / pseudo_huber_c at "
                      "its times t)" if isinstance(schedule, Schedule) else "")
        raise TypeError(f"schedule must be a NoiseSchedule (for a diffusers scheduler use "
                        f"NoiseSchedule.from_diffusers(scheduler)), got {type(schedule).__name__}{continuous}")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # math.isfinite does not trace under torch.compile(dynamic=True)
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value
