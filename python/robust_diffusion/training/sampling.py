"""DDPM ancestral sampling and DDIM for any :class:`NoiseSchedule`, in the three prediction types.

The math lives in two pure-tensor step functions, :func:`ddpm_step` and :func:`ddim_step`, that take the
schedule values as Python floats (double precision on the host) and are ``torch.jit.script``-able, so the
LibTorch sampler can mirror them line by line. With ``abar_t`` and ``abar_prev`` the cumulative alphas at
the current and next (smaller) timestep, and ``abar_prev = 1`` after the last step:

    x0, eps   from the model output (:func:`predict_x0_and_epsilon`); x0 optionally clamped to [-1, 1]
              and eps then recomputed from the clamped x0, so both stay consistent with x_t
    DDIM:     sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)
              x_prev  = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    DDPM:     alpha = abar_t / abar_prev, beta = 1 - alpha (respaced chains use these effective values)
              x_prev  = sqrt(abar_prev) beta / (1 - abar_t) x0
                        + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t + sigma z
              sigma^2 = beta (1 - abar_prev) / (1 - abar_t)  ("fixed_small", the true posterior variance)
                        or beta                              ("fixed_large")

DDPM with ``fixed_small`` and DDIM with ``eta = 1`` are the same chain. Zero terminal SNR (``abar = 0`` at the
first sampled step) works with ``sample`` and ``v_prediction``; with ``epsilon`` x0 is undefined there
(Lin et al. 2023) and the samplers say so.

Flow matching (:func:`flow_sample`) integrates the learned velocity ``v = eps - x0`` from pure noise at t = 1 to
data at t = 0 over the grid ``t_0 = 1 > t_1 > ... > t_N = 0`` (:meth:`FlowMatchingSchedule.inference_times`, or
diffusers' sigmas):

    Euler:    x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)                 (diffusers' FlowMatchEulerDiscreteScheduler)
    Heun:     x'      = x_i + (t_{i+1} - t_i) v(x_i, t_i)
              x_{i+1} = x_i + (t_{i+1} - t_i) (v(x_i, t_i) + v(x', t_{i+1})) / 2   (Euler where t_{i+1} = 0)

Heun takes a plain Euler step where the step ends at t = 0, as k-diffusion's and diffusers'
``FlowMatchHeunDiscreteScheduler`` do: near t = 0 the velocity of a finite training set is (x - x0) / t, singular
at 0. The default grid therefore ends with a tiny step, from 1 / num_train_timesteps to 0 (diffusers' grid).

Every sampler takes ``class_labels`` for a class-conditional model and a classifier-free guidance scale s (Ho &
Salimans 2022), applied to the model output of any prediction type (each is affine in eps at fixed x_t):

    out = out(x, t, null) + s (out(x, t, y) - out(x, t, null))      (:func:`guided_output`; DiTPipeline's formula)

with both calls batched as one of 2B, the conditional half first, as diffusers' class-conditional pipelines do.
s = 1 (default) is the conditional model alone, one call of B per step; s = 0 the unconditional one.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..continuous import FlowMatchingSchedule
from ..schedules import NoiseSchedule, canonical_prediction_type
from .models import model_prediction, null_class_label

__all__ = [
    "TIMESTEP_SPACINGS",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "FLOW_SOLVERS",
    "flow_sample",
    "flow_step",
    "guided_output",
    "inference_timesteps",
    "predict_x0_and_epsilon",
]

TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
FLOW_SOLVERS = ("euler", "heun")
#: What the samplers take as ``class_labels``: one int for every sample, ``[B]`` ints, or ``None`` (unconditional).
Labels = Optional[Union[int, Sequence[int], Tensor]]
_VARIANCES = ("fixed_small", "fixed_large")


def predict_x0_and_epsilon(x_t: Tensor, model_output: Tensor, alpha_cumprod_t: float, prediction_type: str,
                           clip_sample: bool) -> Tuple[Tensor, Tensor]:
    """Convert a model output at ``x_t`` into ``(x0, eps)`` with ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``.

    ``prediction_type`` is ``"epsilon"``, ``"sample"`` or ``"v_prediction"`` (v = sqrt(abar) eps - sqrt(1-abar) x0).
    With ``clip_sample`` x0 is clamped to [-1, 1] and eps recomputed from it.
    """
    a = math.sqrt(alpha_cumprod_t)
    s = math.sqrt(1.0 - alpha_cumprod_t)
    if prediction_type == "epsilon":
        if a == 0.0:
            raise ValueError("prediction_type 'epsilon' cannot recover x0 where alphas_cumprod is 0 "
                             "(zero terminal SNR); use 'v_prediction' or 'sample'")
        eps = model_output
        x0 = (x_t - s * model_output) / a
    elif prediction_type == "sample":
        x0 = model_output
        # s == 0 only where abar rounded to 1; eps then has coefficient 0 in every update.
        eps = (x_t - a * model_output) / s if s > 0.0 else torch.zeros_like(x_t)
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s * model_output
        eps = s * x_t + a * model_output
    else:
        raise ValueError("prediction_type must be 'epsilon', 'sample' or 'v_prediction', got '"
                         + prediction_type + "'")
    if clip_sample:
        x0 = x0.clamp(-1.0, 1.0)
        if s > 0.0:
            eps = (x_t - a * x0) / s
    return x0, eps


def ddim_step(x_t: Tensor, model_output: Tensor, alpha_cumprod_t: float, alpha_cumprod_prev: float, eta: float,
              noise: Optional[Tensor], prediction_type: str, clip_sample: bool) -> Tuple[Tensor, Tensor]:
    """One DDIM update from ``x_t`` to ``x_prev`` (Song et al. 2021, eq. 12). Returns ``(x_prev, x0)``.

    ``noise`` (standard normal, shape of ``x_t``) is used only when the step has ``sigma > 0``;
    pass ``None`` for ``eta = 0`` and for the last step.
    """
    x0, eps = predict_x0_and_epsilon(x_t, model_output, alpha_cumprod_t, prediction_type, clip_sample)
    one_minus_t = 1.0 - alpha_cumprod_t
    variance = 0.0
    if one_minus_t > 0.0 and alpha_cumprod_prev > 0.0:
        variance = (1.0 - alpha_cumprod_prev) / one_minus_t * (1.0 - alpha_cumprod_t / alpha_cumprod_prev)
    sigma = eta * math.sqrt(max(variance, 0.0))
    direction = math.sqrt(max(1.0 - alpha_cumprod_prev - sigma * sigma, 0.0))
    x_prev = math.sqrt(alpha_cumprod_prev) * x0 + direction * eps
    if noise is not None and sigma > 0.0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddpm_step(x_t: Tensor, model_output: Tensor, alpha_cumprod_t: float, alpha_cumprod_prev: float,
              noise: Optional[Tensor], prediction_type: str, clip_sample: bool,
              variance_type: str = "fixed_small") -> Tuple[Tensor, Tensor]:
    """One ancestral DDPM update: a draw from ``q(x_prev | x_t, x0_hat)`` (Ho et al. 2020, eqs. 6-7).

    Works on respaced chains: ``alpha = abar_t / abar_prev`` is the effective one-step alpha.
    ``noise`` is ignored when ``None`` (the last step). Returns ``(x_prev, x0)``.
    """
    x0, eps = predict_x0_and_epsilon(x_t, model_output, alpha_cumprod_t, prediction_type, clip_sample)
    alpha = alpha_cumprod_t / alpha_cumprod_prev
    beta = 1.0 - alpha
    one_minus_t = 1.0 - alpha_cumprod_t
    if one_minus_t > 0.0:
        coef_x0 = math.sqrt(alpha_cumprod_prev) * beta / one_minus_t
        coef_xt = math.sqrt(alpha) * (1.0 - alpha_cumprod_prev) / one_minus_t
        posterior_variance = beta * (1.0 - alpha_cumprod_prev) / one_minus_t
    else:  # abar_t == 1 (a schedule stored in low precision): x_t is already x0
        coef_x0, coef_xt, posterior_variance = 1.0, 0.0, 0.0
    mean = coef_x0 * x0 + coef_xt * x_t
    if noise is None:
        return mean, x0
    if variance_type == "fixed_small":
        variance = posterior_variance
    elif variance_type == "fixed_large":
        variance = beta
    else:
        raise ValueError("variance_type must be 'fixed_small' or 'fixed_large', got '" + variance_type + "'")
    return mean + math.sqrt(max(variance, 0.0)) * noise, x0


def guided_output(conditional: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: ``unconditional + guidance_scale * (conditional - unconditional)``."""
    return unconditional + guidance_scale * (conditional - unconditional)


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing") -> List[int]:
    """The descending timesteps a sampler visits (diffusers' ``timestep_spacing``).

    ``"trailing"`` (default; Lin et al. 2023) always starts at ``T - 1``, the only choice that reaches zero
    terminal SNR; ``"leading"`` is ``k * (T // num_steps)`` (DDIM's original, ends at 0);
    ``"linspace"`` rounds ``linspace(0, T - 1, num_steps)``. All give ``T-1, ..., 0`` when ``num_steps == T``.
    """
    if int(num_steps) != num_steps or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], got {num_steps!r}")
    if spacing == "trailing":
        steps = [round(num_train_timesteps - k * num_train_timesteps / num_steps) - 1 for k in range(num_steps)]
    elif spacing == "leading":
        steps = [k * (num_train_timesteps // num_steps) for k in reversed(range(num_steps))]
    elif spacing == "linspace":
        steps = [round(k * (num_train_timesteps - 1) / max(num_steps - 1, 1)) for k in reversed(range(num_steps))]
    else:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    return steps


@torch.no_grad()
def ddim_sample(model: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule, shape: Sequence[int], *,
                num_steps: int = 50, eta: float = 0.0, prediction_type: Optional[str] = None,
                clip_denoised: bool = True, timestep_spacing: str = "trailing",
                generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
                dtype: torch.dtype = torch.float32, x_T: Optional[Tensor] = None,
                progress: bool = False, class_labels: Labels = None, guidance_scale: float = 1.0,
                null_label: Optional[int] = None) -> Tensor:
    """Sample with DDIM (``eta = 0``: deterministic; ``eta = 1``: DDPM's posterior variance).

    Args:
        model: called as ``model(x_t, t)`` with ``t`` an int64 tensor ``[B]``; returns a tensor of
            ``x_t``'s shape (or an object with ``.sample``, as diffusers' UNets do).
        schedule: the training schedule; ``prediction_type`` defaults to ``schedule.prediction_type``.
        shape: ``[B, ...]`` of the samples.
        clip_denoised: clamp each x0 prediction to [-1, 1] (image data); turn off for unbounded data.
        generator: makes the initial noise and every step's noise reproducible; it must live on ``device``.
        device: defaults to ``x_T``'s, else the model's parameters', else the CPU.
        x_T: the starting noise instead of a fresh draw.
        progress: show a tqdm bar.
        class_labels: for a class-conditional model, the class of each sample (an int for all, or ``[B]``); the model
            is then called as ``model(x_t, t, class_labels=...)`` (our ``UNet(num_classes=K)``, diffusers'
            ``UNet2DModel(num_class_embeds=K + 1)``). ``None``: ``model(x_t, t)``, as for an unconditional model.
        guidance_scale: classifier-free guidance (module docstring); 1 (default): none, one model call per step.
        null_label: the label of the unconditional prediction (default: the model's,
            :func:`~robust_diffusion.training.models.null_class_label`).
    """
    if not (isinstance(eta, (int, float)) and eta >= 0.0):
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")

    def step(x: Tensor, output: Tensor, abar_t: float, abar_prev: float, noise: Optional[Tensor],
             kind: str) -> Tensor:
        return ddim_step(x, output, abar_t, abar_prev, float(eta), noise, kind, clip_denoised)[0]

    guidance = (class_labels, guidance_scale, null_label)
    return _sample(model, schedule, shape, step, num_steps, prediction_type, timestep_spacing, generator,
                   device, dtype, x_T, progress, needs_noise=eta > 0, description="DDIM", guidance=guidance)


@torch.no_grad()
def ddpm_sample(model: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule, shape: Sequence[int], *,
                num_steps: Optional[int] = None, variance_type: str = "fixed_small",
                prediction_type: Optional[str] = None, clip_denoised: bool = True,
                timestep_spacing: str = "trailing", generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                x_T: Optional[Tensor] = None, progress: bool = False, class_labels: Labels = None,
                guidance_scale: float = 1.0, null_label: Optional[int] = None) -> Tensor:
    """Ancestral DDPM sampling over all ``T`` steps (default) or a respaced chain of ``num_steps``.

    ``variance_type`` is ``"fixed_small"`` (posterior variance, DDPM's choice for CIFAR-10) or
    ``"fixed_large"`` (beta). Other arguments (``class_labels``, ``guidance_scale``) as in :func:`ddim_sample`.
    """
    if variance_type not in _VARIANCES:
        raise ValueError(f"variance_type must be one of {', '.join(_VARIANCES)}, got {variance_type!r}")

    def step(x: Tensor, output: Tensor, abar_t: float, abar_prev: float, noise: Optional[Tensor],
             kind: str) -> Tensor:
        return ddpm_step(x, output, abar_t, abar_prev, noise, kind, clip_denoised, variance_type)[0]

    num_steps = schedule.num_timesteps if num_steps is None else num_steps
    return _sample(model, schedule, shape, step, num_steps, prediction_type,
                   timestep_spacing, generator, device, dtype, x_T, progress, needs_noise=True,
                   description="DDPM", guidance=(class_labels, guidance_scale, null_label))


def _sample(model, schedule: NoiseSchedule, shape: Sequence[int], step, num_steps: int,
            prediction_type: Optional[str], timestep_spacing: str, generator: Optional[torch.Generator],
            device: Optional[torch.device], dtype: torch.dtype, x_T: Optional[Tensor], progress: bool,
            needs_noise: bool, description: str, guidance: Tuple) -> Tensor:
    kind = canonical_prediction_type(prediction_type or schedule.prediction_type)
    timesteps = inference_timesteps(schedule.num_timesteps, num_steps, timestep_spacing)
    alphas_cumprod = schedule.alphas_cumprod.tolist()  # float64 on the host, read once
    if kind == "epsilon" and alphas_cumprod[timesteps[0]] == 0.0:
        raise ValueError(f"the schedule has zero terminal SNR (alphas_cumprod[{timesteps[0]}] = 0), where "
                         f"prediction_type 'epsilon' cannot recover x0; train with 'v_prediction' or 'sample'")
    shape = tuple(int(s) for s in shape)
    x, device = _starting_noise(model, shape, generator, device, dtype, x_T)
    denoise = _denoiser(model, shape[0], device, *guidance)

    iterator = timesteps
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(timesteps, desc=f"{description} sampling", unit="step")
    for i, t in enumerate(iterator):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        abar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else 1.0
        output = denoise(x, torch.full((shape[0],), t, device=device, dtype=torch.int64))
        noise = (torch.randn(shape, generator=generator, device=device, dtype=dtype)
                 if needs_noise and prev_t >= 0 else None)
        x = step(x, output.to(dtype), alphas_cumprod[t], abar_prev, noise, kind)
    return x


def flow_step(x: Tensor, velocity: Tensor, t: float, t_next: float) -> Tensor:
    """One Euler step of the flow ODE from time ``t`` to ``t_next`` (< ``t``): ``x + (t_next - t) v``."""
    return x + (t_next - t) * velocity


@torch.no_grad()
def flow_sample(model: Callable[[Tensor, Tensor], Tensor], schedule: FlowMatchingSchedule, shape: Sequence[int], *,
                num_steps: int = 50, solver: str = "euler", times: Optional[Sequence[float]] = None,
                generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
                dtype: torch.dtype = torch.float32, x_T: Optional[Tensor] = None, progress: bool = False,
                class_labels: Labels = None, guidance_scale: float = 1.0, null_label: Optional[int] = None) -> Tensor:
    """Sample a flow-matching model (module docstring): Euler or Heun from noise at t = 1 to t = 0.

    Args:
        model: called as ``model(x_t, schedule.model_timestep(t))`` (``t * num_train_timesteps``, float32 ``[B]``)
            and returns the velocity ``eps - x0`` (or an object with ``.sample``).
        times: the descending grid from 1 (or below) to 0 (default: ``schedule.inference_times(num_steps)``); e.g.
            a diffusers ``FlowMatchEulerDiscreteScheduler``'s ``sigmas`` after ``set_timesteps``.
        solver: ``"euler"`` (one model call per step) or ``"heun"`` (two, second order; module docstring).
        Other arguments (``class_labels``, ``guidance_scale``: guidance of the velocity) as in :func:`ddim_sample`.
    """
    if not isinstance(schedule, FlowMatchingSchedule):
        raise TypeError(f"flow_sample: schedule must be a FlowMatchingSchedule, got {type(schedule).__name__}")
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"flow_sample: solver must be one of {', '.join(FLOW_SOLVERS)}, got {solver!r}")
    grid = (schedule.inference_times(num_steps) if times is None
            else torch.as_tensor(times, dtype=torch.float64).detach().cpu()).tolist()
    if len(grid) < 2 or grid[-1] != 0.0 or not all(a > b for a, b in zip(grid, grid[1:])) or not grid[0] <= 1.0:
        raise ValueError(f"flow_sample: times must fall strictly from at most 1 down to 0 (at least two), got "
                         f"{[round(v, 4) for v in grid[:4]]}{' ...' if len(grid) > 4 else ''}")
    shape = tuple(int(s) for s in shape)
    x, device = _starting_noise(model, shape, generator, device, dtype, x_T)
    denoise = _denoiser(model, shape[0], device, class_labels, guidance_scale, null_label)

    def velocity(x: Tensor, t: float) -> Tensor:
        time = schedule.model_timestep(torch.full((shape[0],), t, device=device, dtype=torch.float32))
        return denoise(x, time).to(dtype)

    steps = range(len(grid) - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"flow {solver} sampling", unit="step")
    for i in steps:
        t, t_next = grid[i], grid[i + 1]
        v = velocity(x, t)
        euler = flow_step(x, v, t, t_next)
        if solver == "heun" and t_next > 0:
            x = flow_step(x, (v + velocity(euler, t_next)) / 2, t, t_next)
        else:
            x = euler
    return x


def _denoiser(model, batch: int, device: torch.device, class_labels: Labels, guidance_scale: float,
              null_label: Optional[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x, t)``: the model's prediction at ``x``, conditioned on ``class_labels`` and guided by ``guidance_scale``
    (module docstring); ``model(x, t)`` alone without labels."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}")
    if class_labels is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} guides a class-conditional model: pass class_labels "
                             f"(or guidance_scale=1.0 for an unconditional model)")
        return lambda x, t: model_prediction(model(x, t), x)
    labels = torch.as_tensor(class_labels, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers (an int or [{batch}]), got {labels.dtype}")
    labels = labels.to(torch.int64).expand(batch) if labels.dim() == 0 else labels.to(torch.int64)
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"class_labels must be an int or hold one label per sample, [{batch}], got "
                         f"{tuple(labels.shape)}")
    if guidance_scale == 1.0:
        return lambda x, t: model_prediction(model(x, t, class_labels=labels), x)
    null = null_class_label(model) if null_label is None else int(null_label)
    if null is None:
        raise ValueError("guidance_scale needs the null label of the unconditional prediction: the model is not our "
                         "UNet(num_classes=K) nor a diffusers model with num_class_embeds, so pass null_label=")
    both = torch.cat([labels, torch.full_like(labels, null)])

    def guided(x: Tensor, t: Tensor) -> Tensor:
        output = model_prediction(model(torch.cat([x, x]), torch.cat([t, t]), class_labels=both),
                                  torch.cat([x, x]))
        conditional, unconditional = output.chunk(2)
        return guided_output(conditional, unconditional, float(guidance_scale))

    return guided


def _starting_noise(model, shape: Tuple[int, ...], generator: Optional[torch.Generator],
                    device: Optional[torch.device], dtype: torch.dtype,
                    x_T: Optional[Tensor]) -> Tuple[Tensor, torch.device]:
    """The chain's start, ``x_T`` or a fresh draw, and the device it runs on (default: ``x_T``'s, else the
    model's)."""
    if device is None:
        device = x_T.device if x_T is not None else _module_device(model)
    if x_T is None:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype), device
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    return x_T.to(device=device, dtype=dtype), device


def _module_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")
