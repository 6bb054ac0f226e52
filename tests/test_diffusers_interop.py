"""Peer tests with the real diffusers package: schedules from DDPMScheduler, and the losses of
diffusers' training scripts (min-SNR weighting; scheduled pseudo-Huber) re-created line for line."""

import math

import pytest
import torch

import robust_diffusion as rd

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402


def diffusers_conditional_loss(model_pred, target, loss_type, huber_c):
    """examples/research_projects/scheduled_huber_loss_training: conditional_loss(reduction="mean")."""
    if loss_type == "huber":
        return torch.mean(2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c ** 2) - huber_c))
    return torch.mean(2 * (torch.sqrt((model_pred - target) ** 2 + huber_c ** 2) - huber_c))


def diffusers_huber_c(scheduler, timestep, huber_c, huber_schedule):
    """The same script's per-step c (it draws one timestep per batch)."""
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return math.exp(-alpha * timestep)
    if huber_schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod[timestep]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return float((1 - huber_c) / (1 + sigmas) ** 2 + huber_c)
    return huber_c


@pytest.mark.parametrize("rescale", [False, True], ids=["default", "zero_snr"])
def test_schedule_from_diffusers(rescale):
    scheduler = DDPMScheduler(rescale_betas_zero_snr=rescale, prediction_type="v_prediction")
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    assert schedule.prediction_type == "v_prediction"
    torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.double())
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.velocity(x0, noise, t), scheduler.get_velocity(x0, noise, t),
                               rtol=1e-5, atol=1e-5)
    if rescale:
        assert schedule.alphas_cumprod[-1] == 0 and torch.isfinite(schedule.vlb_weight).all()


@pytest.mark.parametrize("form", ["huber", "smooth_l1"])
@pytest.mark.parametrize("c_schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("rescale", [False, True], ids=["default", "zero_snr"])
def test_pseudo_huber_matches_diffusers_training_script(form, c_schedule, rescale):
    scheduler = DDPMScheduler(rescale_betas_zero_snr=rescale)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    # t = 999 too under zero terminal SNR: diffusers' snr formula gives sigma = inf there and c exactly huber_c.
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = rd.pseudo_huber_loss(pred, target, t, c=0.1, c_schedule=c_schedule, form=form, schedule=schedule,
                                reduction="none")
    for b in range(6):
        c = diffusers_huber_c(scheduler, int(t[b]), 0.1, c_schedule)
        assert math.isfinite(c)
        expected = diffusers_conditional_loss(pred[b:b + 1], target[b:b + 1], form, c)
        assert ours[b].item() == pytest.approx(expected.item(), rel=1e-6)


def diffusers_min_snr_loss(scheduler, pred, target, timesteps, snr_gamma, reduction="mean"):
    """examples/text_to_image/train_text_to_image.py, the snr_gamma branch."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean() if reduction == "mean" else loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_diffusers_training_script(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, 1000, (8,), generator=g)
    snr_gamma = 5.0
    expected = diffusers_min_snr_loss(scheduler, pred, target, timesteps, snr_gamma)

    weights = rd.loss_weights(schedule, timesteps, "min_snr", gamma=snr_gamma)
    assert rd.kl_loss(pred, target, weight=weights).item() == pytest.approx(expected.item(), rel=1e-6)
    module = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="min_snr", weighting_params={"gamma": 5.0})
    assert module(pred, target, timesteps).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_diffusers_training_script_at_zero_terminal_snr(prediction_type):
    """DDPMScheduler(rescale_betas_zero_snr=True), with t = 999 (abar = 0, SNR = 0) in the batch.

    What diffusers' formula gives at t = 999: v-prediction min(0, gamma) / (0 + 1) = 0, finite; epsilon
    min(0, gamma) / 0 = NaN, which makes its whole batch loss NaN. Ours (terminal="clamp") takes the weight of
    the smallest finite log-SNR, t = 998: in v-space min(SNR, gamma) / (SNR + 1) = SNR_998 = 4.2e-9 instead of 0,
    a difference far below the 1e-6 tolerance, so the v loss matches diffusers' with t = 999 included; in
    epsilon space min(1, gamma / SNR_998) = 1 (the plain MSE) instead of NaN.
    """
    scheduler = DDPMScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=True)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    assert schedule.alphas_cumprod[-1] == 0
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    timesteps = torch.tensor([999, 0, 1, 250, 500, 900, 998, 999])
    snr_gamma = 5.0
    theirs = diffusers_min_snr_loss(scheduler, pred, target, timesteps, snr_gamma, reduction="none")
    module = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="min_snr",
                                    weighting_params={"gamma": snr_gamma}, reduction="none")
    ours = module(pred, target, timesteps)
    assert torch.isfinite(ours).all()
    terminal = timesteps == 999
    torch.testing.assert_close(ours[~terminal], theirs[~terminal], rtol=1e-6, atol=0)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    if prediction_type == "v_prediction":
        assert (theirs[terminal] == 0).all()
        assert (ours[terminal] > 0).all() and (ours[terminal] < 1e-8 * mse[terminal]).all()
        mean = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="min_snr",
                                      weighting_params={"gamma": snr_gamma})
        expected = diffusers_min_snr_loss(scheduler, pred, target, timesteps, snr_gamma)
        assert torch.isfinite(expected)
        assert mean(pred, target, timesteps).item() == pytest.approx(expected.item(), rel=1e-6)
    else:
        assert theirs[terminal].isnan().all()
        torch.testing.assert_close(ours[terminal], mse[terminal], rtol=1e-6, atol=0)
