"""Tests for robust_diffusion.training.sampling: step math, exact-oracle samplers, determinism, errors.

The oracles are the exact minimisers of the training loss for simple data: a single point, where
eps_hat(x_t) = (x_t - sqrt(abar) x*) / sqrt(1 - abar), and a 1-D Gaussian N(mu, s^2), where
E[x0 | x_t] = mu + sqrt(abar) s^2 (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). A correct sampler driven
by them must return the point / the Gaussian.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import robust_diffusion as rd
from robust_diffusion.training.models import UNet
from robust_diffusion.training.sampling import (ddim_sample, ddim_step, ddpm_sample, ddpm_step, flow_sample,
                                            inference_timesteps, predict_x0_and_epsilon)
from robust_diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
MU, STD = 0.3, 0.2


def _output_for(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0


def _gaussian_oracle(schedule: NoiseSchedule, prediction_type: str):
    abars = schedule.alphas_cumprod.tolist()

    def model(x, t):
        abar = abars[int(t[0])]
        x0 = MU + math.sqrt(abar) * STD ** 2 * (x - math.sqrt(abar) * MU) / (abar * STD ** 2 + 1 - abar)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        return _output_for(prediction_type, x0, eps, abar)

    return model


# ---------------------------------------------------------------------------------------------- step math
def test_inference_timesteps():
    assert inference_timesteps(1000, 50)[:2] == [999, 979] and inference_timesteps(1000, 50)[-1] == 19
    leading = inference_timesteps(1000, 50, "leading")
    assert leading[:2] == [980, 960] and leading[-1] == 0
    assert inference_timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    for spacing in ("trailing", "leading", "linspace"):
        assert inference_timesteps(10, 10, spacing) == list(range(9, -1, -1))
        assert inference_timesteps(10, 1, spacing)[0] == (9 if spacing == "trailing" else 0)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 10\]"):
        inference_timesteps(10, 11)
    with pytest.raises(ValueError, match="timestep_spacing must be one of trailing, leading, linspace"):
        inference_timesteps(10, 5, "karras")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_x0_and_epsilon_inverts_the_forward_process(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 5, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    abar = 0.37
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    output = _output_for(prediction_type, x0, eps, abar)
    x0_hat, eps_hat = predict_x0_and_epsilon(x_t, output, abar, prediction_type, clip_sample=False)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-12, atol=1e-12)
    # Clipping keeps (x0, eps) consistent with x_t.
    x0_clip, eps_clip = predict_x0_and_epsilon(x_t, output * 3, abar, prediction_type, clip_sample=True)
    assert x0_clip.abs().max() <= 1
    torch.testing.assert_close(math.sqrt(abar) * x0_clip + math.sqrt(1 - abar) * eps_clip, x_t)


def test_ddpm_fixed_small_equals_ddim_eta_one():
    generator = torch.Generator().manual_seed(1)
    x_t, output, noise = (torch.randn(3, 7, generator=generator, dtype=torch.float64) for _ in range(3))
    for prediction_type in PREDICTION_TYPES:
        ddpm, ddpm_x0 = ddpm_step(x_t, output, 0.3, 0.6, noise, prediction_type, False)
        ddim, ddim_x0 = ddim_step(x_t, output, 0.3, 0.6, 1.0, noise, prediction_type, False)
        torch.testing.assert_close(ddpm, ddim, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ddpm_x0, ddim_x0, rtol=0, atol=0)
    large, _ = ddpm_step(x_t, output, 0.3, 0.6, noise, "epsilon", False, "fixed_large")
    mean, _ = ddpm_step(x_t, output, 0.3, 0.6, None, "epsilon", False)
    torch.testing.assert_close(large - mean, math.sqrt(0.5) * noise)  # beta = 1 - 0.3 / 0.6


def test_step_functions_are_scriptable():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated since torch 2.11
        scripted_ddim, scripted_ddpm = torch.jit.script(ddim_step), torch.jit.script(ddpm_step)
    generator = torch.Generator().manual_seed(2)
    x_t, output, noise = (torch.randn(2, 3, generator=generator) for _ in range(3))
    for prediction_type in PREDICTION_TYPES:
        for clip in (False, True):
            expected = ddim_step(x_t, output, 0.2, 0.5, 0.5, noise, prediction_type, clip)
            actual = scripted_ddim(x_t, output, 0.2, 0.5, 0.5, noise, prediction_type, clip)
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
            expected = ddpm_step(x_t, output, 0.2, 0.5, noise, prediction_type, clip, "fixed_small")
            actual = scripted_ddpm(x_t, output, 0.2, 0.5, noise, prediction_type, clip, "fixed_small")
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- exact oracles
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_single_point_dataset_is_recovered(sampler):
    schedule = NoiseSchedule.linear()
    point = torch.tensor([0.5, -0.25, 0.75], dtype=torch.float64)
    abars = schedule.alphas_cumprod.tolist()

    def exact_epsilon(x, t):
        abar = abars[int(t[0])]
        return (x - math.sqrt(abar) * point) / math.sqrt(1 - abar)

    generator = torch.Generator().manual_seed(0)
    if sampler == "ddim":
        out = ddim_sample(exact_epsilon, schedule, (6, 3), num_steps=10, eta=0.0, generator=generator,
                          dtype=torch.float64)
    else:
        out = ddpm_sample(exact_epsilon, schedule, (6, 3), num_steps=25, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(out, point.expand(6, 3), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_gaussian_data_is_recovered_over_the_full_chain(sampler):
    schedule = NoiseSchedule.linear()
    model = _gaussian_oracle(schedule, "epsilon")
    generator = torch.Generator().manual_seed(0)
    sample = ddim_sample if sampler == "ddim" else ddpm_sample
    out = sample(model, schedule, (4000, 1), num_steps=1000, generator=generator, dtype=torch.float64,
                 clip_denoised=False)
    assert abs(out.mean().item() - MU) < 0.012  # 3.8 standard errors
    assert abs(out.std().item() - STD) < 0.008


def test_prediction_types_give_identical_ddim_trajectories():
    schedule = NoiseSchedule.cosine(200)
    x_T = torch.randn(50, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    outs = [ddim_sample(_gaussian_oracle(schedule, kind), schedule, (50, 1), num_steps=20, eta=0.0, x_T=x_T,
                        prediction_type=kind, dtype=torch.float64, clip_denoised=True) for kind in PREDICTION_TYPES]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-9, atol=1e-9)


def test_zero_terminal_snr_with_v_prediction():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True, prediction_type="v_prediction")
    assert schedule.alphas_cumprod[-1] == 0
    generator = torch.Generator().manual_seed(4)
    out = ddim_sample(_gaussian_oracle(schedule, "v_prediction"), schedule, (4000, 1), num_steps=1000,
                      generator=generator, dtype=torch.float64, clip_denoised=False)
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.012 and abs(out.std().item() - STD) < 0.008
    with pytest.raises(ValueError, match="zero terminal SNR .* prediction_type 'epsilon' cannot recover x0"):
        ddim_sample(_gaussian_oracle(schedule, "epsilon"), schedule, (2, 1), prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------- with a network
def _micro_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(), norm_groups=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("sampler, kwargs", [(ddpm_sample, {"num_steps": 8}), (ddim_sample, {"num_steps": 5}),
                                             (ddim_sample, {"num_steps": 5, "eta": 0.5})])
def test_samplers_are_reproducible_with_a_generator(sampler, kwargs):
    model, schedule = _micro_unet(), NoiseSchedule.linear()

    def draw(seed):
        return sampler(model, schedule, (2, 1, 8, 8), generator=torch.Generator().manual_seed(seed), **kwargs)

    first = draw(0)
    assert first.shape == (2, 1, 8, 8) and first.dtype == torch.float32
    assert first.abs().max() <= 1  # the last step returns the clipped x0
    torch.testing.assert_close(draw(0), first, rtol=0, atol=0)
    assert not torch.equal(draw(1), first)


def test_sampler_accepts_diffusers_style_outputs_and_progress_bar():
    schedule = NoiseSchedule.linear(20)
    wrapped = lambda x, t: SimpleNamespace(sample=torch.zeros_like(x))  # noqa: E731
    out = ddpm_sample(wrapped, schedule, (3, 2), generator=torch.Generator().manual_seed(0), progress=True)
    assert out.shape == (3, 2)


def test_sampler_errors():
    schedule = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match=r"the model must return a tensor of its input's shape \(3, 2\).*got \(3,\)"):
        ddim_sample(lambda x, t: x[:, 0], schedule, (3, 2))
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        ddim_sample(lambda x, t: x, schedule, (3, 2), eta=-1.0)
    with pytest.raises(ValueError, match="variance_type must be one of fixed_small, fixed_large"):
        ddpm_sample(lambda x, t: x, schedule, (3, 2), variance_type="learned")
    with pytest.raises(ValueError, match=r"x_T must have shape \(3, 2\)"):
        ddim_sample(lambda x, t: x, schedule, (3, 2), x_T=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ddim_sample(lambda x, t: x, schedule, (3, 2), prediction_type="score")
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 20\], got 50"):
        ddim_sample(lambda x, t: x, NoiseSchedule.linear(20), (3, 2), num_steps=50)


# ---------------------------------------------------------------------------------------------- flow matching
def _gaussian_velocity(spread):
    """The exact velocity of rectified flow for data N(0, spread^2): v = (t - (1 - t) s^2) x / ((1 - t)^2 s^2 + t^2)
    (E[eps | x_t] - E[x0 | x_t]); its ODE carries x(1) to x(0) = s x(1) along x(t) = x(1) sqrt((1 - t)^2 s^2 + t^2)."""
    def model(x, timestep):
        t = (timestep.double() / 1000).view(-1, *([1] * (x.dim() - 1)))
        return ((t - (1 - t) * spread ** 2) * x.double() / ((1 - t) ** 2 * spread ** 2 + t ** 2)).to(x.dtype)
    return model


def test_flow_samplers_follow_the_exact_ode_and_heun_is_second_order():
    schedule = rd.FlowMatchingSchedule()  # shift 1: a uniform grid, where the orders show from 10 steps on
    x1 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = 0.3 * x1
    errors = {}
    for solver in ("euler", "heun"):
        for steps in (10, 20):
            out = flow_sample(_gaussian_velocity(0.3), schedule, x1.shape, num_steps=steps, solver=solver, x_T=x1,
                              dtype=torch.float64)
            errors[solver, steps] = (out - exact).abs().max().item()
    assert errors["heun", 10] < errors["euler", 10] / 10
    assert errors["euler", 20] < errors["euler", 10] * 0.6  # first order: about halves
    assert errors["heun", 20] < errors["heun", 10] * 0.35  # second order: about a quarter
    shifted = rd.FlowMatchingSchedule(shift=3.0)
    euler, heun = (flow_sample(_gaussian_velocity(0.3), shifted, x1.shape, num_steps=10, solver=solver, x_T=x1,
                               dtype=torch.float64) for solver in ("euler", "heun"))
    assert (heun - exact).abs().max() < (euler - exact).abs().max() / 10
    # A single data point: the paths are straight lines and both solvers land on it exactly.
    point = torch.full((1, 1, 2, 2), 0.7, dtype=torch.float64)
    straight = lambda x, timestep: (x - point) / (timestep.double() / 1000).view(-1, 1, 1, 1)  # noqa: E731
    for solver in ("euler", "heun"):
        torch.testing.assert_close(flow_sample(straight, schedule, (4, 1, 2, 2), num_steps=7, solver=solver,
                                               x_T=x1[:4], dtype=torch.float64), point.expand(4, 1, 2, 2))


def test_flow_sampler_grid_calls_and_errors():
    schedule = rd.FlowMatchingSchedule(shift=3.0)
    grid = schedule.inference_times(4)
    torch.testing.assert_close(grid, torch.cat([schedule.shifted(torch.tensor([1.0, 0.667, 0.334, 0.001],
                                                                              dtype=torch.float64)), torch.zeros(1)]))
    diffusers = pytest.importorskip("diffusers")  # at shift 1 our grid is diffusers'
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(6)
    torch.testing.assert_close(rd.FlowMatchingSchedule().inference_times(6), scheduler.sigmas.double())
    calls = []
    model = lambda x, timestep: calls.append(timestep) or torch.zeros_like(x)  # noqa: E731
    flow_sample(model, schedule, (2, 1, 2, 2), num_steps=4, solver="heun", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 7 and calls[0].dtype == torch.float32 and float(calls[0][0]) == 1000.0  # 2 a step, 1 last
    assert float(calls[-1][0]) == pytest.approx(1.0 * 3 / (1 + 2 * 0.001))  # the Euler step from t = 1 / T to 0
    for kwargs, error, message in [
            (dict(solver="rk4"), ValueError, "solver must be one of euler, heun"),
            (dict(times=[1.0, 0.5]), ValueError, "times must fall strictly from at most 1 down to 0"),
            (dict(times=[1.0, 0.5, 0.5, 0.0]), ValueError, "times must fall strictly"),
            (dict(times=[1.5, 0.0]), ValueError, "times must fall strictly"),
            (dict(num_steps=0), ValueError, "num_steps must be a positive integer")]:
        with pytest.raises(error, match=message):
            flow_sample(model, schedule, (2, 1, 2, 2), **kwargs)
    with pytest.raises(TypeError, match="flow_sample: schedule must be a FlowMatchingSchedule, got NoiseSchedule"):
        flow_sample(model, NoiseSchedule.linear(), (2, 1, 2, 2))


# ---------------------------------------------------------------------------------------------- class labels
class _LabelModel(torch.nn.Module):
    """A prediction that depends on the label: x * 0.1 + label / 10 (the null label, 9, gives 0.9), recording each
    call's batch and labels."""

    null = 9

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.tolist()))
        shift = 0.0 if class_labels is None else class_labels.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) / 10
        return x * 0.1 + shift


def _label_samplers():
    discrete, flow = NoiseSchedule.linear(100), rd.FlowMatchingSchedule()
    return [lambda m, **k: ddim_sample(m, discrete, (2, 1, 4, 4), num_steps=4, null_label=_LabelModel.null, **k),
            lambda m, **k: ddpm_sample(m, discrete, (2, 1, 4, 4), num_steps=4, null_label=_LabelModel.null, **k),
            lambda m, **k: flow_sample(m, flow, (2, 1, 4, 4), num_steps=4, null_label=_LabelModel.null, **k),
            lambda m, **k: flow_sample(m, flow, (2, 1, 4, 4), num_steps=4, solver="heun", null_label=_LabelModel.null,
                                       **k)]


@pytest.mark.parametrize("sampler", _label_samplers(), ids=["ddim", "ddpm", "euler", "heun"])
def test_every_sampler_passes_labels_and_guides_in_one_batched_call(sampler):
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain, labelled, guided = _LabelModel(), _LabelModel(), _LabelModel()
    unconditional = sampler(plain, generator=seed())
    assert all(call == (2, None) for call in plain.calls)  # no labels: model(x, t), as before
    conditional = sampler(labelled, generator=seed(), class_labels=[1, 5])
    assert labelled.calls and all(call == (2, [1, 5]) for call in labelled.calls)  # s = 1: one call of B
    assert not torch.equal(conditional, unconditional)
    torch.testing.assert_close(sampler(_LabelModel(), generator=seed(), class_labels=torch.tensor([1, 5])),
                               conditional, rtol=0, atol=0)
    assert sampler(_LabelModel(), generator=seed(), class_labels=3).shape == (2, 1, 4, 4)  # one int for all
    out = sampler(guided, generator=seed(), class_labels=[1, 5], guidance_scale=3.0)
    assert guided.calls and all(call == (4, [1, 5, 9, 9]) for call in guided.calls)  # 2B: cond first, then null
    assert not torch.equal(out, conditional)
    # s = 0 is the unconditional prediction: the model on the null label alone.
    torch.testing.assert_close(sampler(_LabelModel(), generator=seed(), class_labels=[1, 5], guidance_scale=0.0),
                               sampler(_LabelModel(), generator=seed(), class_labels=[9, 9]), rtol=1e-6, atol=1e-6)


def test_guidance_is_the_classifier_free_formula_in_float64():
    """One guided DDIM step equals the step on eps_u + s (eps_c - eps_u), computed in float64 from the model's two
    outputs."""
    model, schedule = _LabelModel(), NoiseSchedule.linear(100)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = 2.5
    out = ddim_sample(model, schedule, x_T.shape, num_steps=1, x_T=x_T, dtype=torch.float64, class_labels=[1, 5],
                      guidance_scale=s, null_label=9, clip_denoised=False)
    labels = torch.tensor([1.0, 5.0], dtype=torch.float64).view(2, 1, 1, 1)
    eps = (x_T * 0.1 + 0.9) + s * ((x_T * 0.1 + labels / 10) - (x_T * 0.1 + 0.9))
    abar = float(schedule.alphas_cumprod[99])
    expected = (x_T - math.sqrt(1 - abar) * eps) / math.sqrt(abar)  # the last step returns x0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_a_conditional_unet_samples_with_labels_and_guidance():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(), norm_groups=4, num_classes=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    model.eval()
    schedule = NoiseSchedule.linear()
    draw = lambda **k: ddim_sample(model, schedule, (3, 1, 8, 8), num_steps=4,  # noqa: E731
                                   generator=torch.Generator().manual_seed(0), **k)
    a, b = draw(class_labels=[0, 1, 2]), draw(class_labels=[2, 1, 0])
    assert not torch.equal(a, b) and torch.isfinite(a).all()
    guided = draw(class_labels=[0, 1, 2], guidance_scale=4.0)  # the null label (3) from the model itself
    assert torch.isfinite(guided).all() and not torch.equal(guided, a)
    with pytest.raises(ValueError, match="class_labels is missing"):
        draw()


def test_label_and_guidance_errors():
    schedule = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 guides a class-conditional model: pass class_labels"):
        ddim_sample(lambda x, t: x, schedule, (2, 2), guidance_scale=2.0)
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number >= 0 \(1: no guidance\)"):
            ddim_sample(_LabelModel(), schedule, (2, 2), class_labels=[0, 1], guidance_scale=bad)
    with pytest.raises(ValueError, match=r"class_labels must be an int or hold one label per sample, \[2\], "
                                         r"got \(3,\)"):
        ddpm_sample(_LabelModel(), schedule, (2, 2), class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="class_labels must be integers"):
        flow_sample(_LabelModel(), rd.FlowMatchingSchedule(), (2, 2), class_labels=[0.5, 1.0])
    with pytest.raises(ValueError, match="guidance_scale needs the null label .* pass null_label="):
        ddim_sample(_LabelModel(), schedule, (2, 2), class_labels=[0, 1], guidance_scale=2.0)
