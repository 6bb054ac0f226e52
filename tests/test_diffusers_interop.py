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



def test_the_training_kits_diffusers_huber_is_diffusers_default_pseudo_huber():
    """`--loss diffusers_huber` (the main job's baseline) trains with the loss of diffusers' scheduled-Huber
    training script at its defaults (loss_type huber, huber_schedule snr, huber_c 0.1), whatever --scale says."""
    from robust_diffusion.training import experiment

    scheduler = DDPMScheduler()
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    loss_fn = experiment.build_loss("diffusers_huber", schedule, scale="adaptive", temperature=0.25)
    assert loss_fn.scale_mode == "fixed" and loss_fn.fixed_scale == 1.0
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 1, 6, 6, generator=g), torch.randn(5, 1, 6, 6, generator=g)
    t = torch.tensor([0, 3, 400, 800, 999])
    expected = torch.stack([diffusers_conditional_loss(pred[b], target[b], "huber",
                                                       diffusers_huber_c(scheduler, int(t[b]), 0.1, "snr"))
                            for b in range(5)]).mean()
    torch.testing.assert_close(loss_fn(pred, target, t), expected.float(), rtol=1e-6, atol=0)

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


# ---------------------------------------------------------------- samplers against diffusers' schedulers
def tiny_unet2d():
    """A real diffusers UNet2DModel, small enough for the CPU; its output is a UNet2DOutput, not a tensor."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim_scheduler_step_by_step(spacing, prediction_type, eta):
    """Our DDIM and diffusers' DDIMScheduler on the same UNet2DModel and the same noise, every step. diffusers
    re-derives eps from the clipped x0 only with use_clipped_model_output=True; ours always does (the two then
    agree). Its "linspace" spacing takes prev = t - T // N, not the next visited timestep, so only the two
    spacings where those coincide are compared."""
    from diffusers import DDIMScheduler
    from robust_diffusion.training.sampling import ddim_sample, ddim_step, inference_timesteps
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                              clip_sample=True, set_alpha_to_one=True, timestep_spacing=spacing)
    scheduler.set_timesteps(10)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    timesteps = inference_timesteps(1000, 10, spacing)
    assert scheduler.timesteps.tolist() == timesteps
    model, abar = tiny_unet2d(), schedule.alphas_cumprod.tolist()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 1, 8, 8, generator=g)
    ours, theirs, noises = x_T.clone(), x_T.clone(), []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            noise = torch.randn(x_T.shape, generator=g)
            noises.append(noise)
            ours = ddim_step(ours, model(ours, torch.full((2,), t)).sample, abar[t], abar[prev] if prev >= 0 else 1.0,
                             eta, noise if prev >= 0 else None, prediction_type, True)[0]
            theirs = scheduler.step(model(theirs, t).sample, t, theirs, eta=eta, use_clipped_model_output=True,
                                    variance_noise=noise).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"step {i} (t = {t})")
    if eta == 0.0:  # the packaged sampler, with the UNet2DModel as it is
        sampled = ddim_sample(model, schedule, x_T.shape, num_steps=10, eta=0.0, timestep_spacing=spacing, x_T=x_T)
        torch.testing.assert_close(sampled, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_ddpm_scheduler_step_by_step(spacing, prediction_type, variance_type):
    """Our ancestral DDPM sampler and diffusers' DDPMScheduler on a respaced 10-step chain, the same UNet2DModel
    and generators seeded alike (both draw one noise per step after the model call), compared at every step
    (each step from the same x_t) and end to end through ddpm_sample."""
    from diffusers import DDPMScheduler
    from robust_diffusion.training.sampling import ddpm_sample, ddpm_step, inference_timesteps
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                              variance_type=variance_type, clip_sample=True, timestep_spacing=spacing)
    scheduler.set_timesteps(10)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    timesteps = inference_timesteps(1000, 10, spacing)
    assert scheduler.timesteps.tolist() == timesteps
    model, abar = tiny_unet2d(), schedule.alphas_cumprod.tolist()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours, theirs = x_T.clone(), x_T.clone()
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            output = model(ours, torch.full((2,), t)).sample
            noise = torch.randn(x_T.shape, generator=g_ours) if prev >= 0 else None
            ours = ddpm_step(ours, output, abar[t], abar[prev] if prev >= 0 else 1.0, noise, prediction_type, True,
                             variance_type)[0]
            theirs = scheduler.step(model(theirs, t).sample, t, theirs, generator=g_theirs).prev_sample
            expected = ours
            if prev < 0 and t > 0 and variance_type == "fixed_large":
                # diffusers adds noise whenever t > 0, so a chain ending above t = 0 (trailing) gets
                # sqrt(beta) z on its last step with fixed_large; DDPM, and we, add none on the last step.
                expected = ours + math.sqrt(1.0 - abar[t]) * torch.randn(x_T.shape, generator=g_ours)
            torch.testing.assert_close(expected, theirs, rtol=1e-4, atol=1e-4, msg=f"step {i} (t = {t})")
            theirs = ours
    sampled = ddpm_sample(model, schedule, x_T.shape, num_steps=10, variance_type=variance_type,
                          timestep_spacing=spacing, x_T=x_T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sampled, ours, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_equals_diffusers_dit_pipeline():
    """Our guided DDIM against DiTPipeline's loop, re-created line for line on a class-conditional UNet2DModel
    (num_class_embeds = K + 1, the last row the null label, as DiT's 1000 of 1001): the latents doubled, the labels
    followed by the null class, one call of 2B, ``uncond_eps + guidance_scale * (cond_eps - uncond_eps)``, then the
    scheduler's step. The formula is read from diffusers' own source first, so a change there fails here."""
    import inspect
    from diffusers import DDIMScheduler, DiTPipeline, UNet2DModel
    from robust_diffusion.training.models import null_class_label
    from robust_diffusion.training.sampling import ddim_sample
    source = inspect.getsource(DiTPipeline.__call__)
    assert "half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)" in source
    assert "cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)" in source
    assert "torch.cat([class_labels, class_null], 0)" in source
    num_classes, guidance_scale = 3, 4.0
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, num_class_embeds=num_classes + 1).eval()
    assert null_class_label(model) == num_classes
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    class_labels = [2, 0]
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # DiTPipeline.__call__ with guidance_scale > 1, its transformer replaced by the UNet
        labels = torch.tensor(class_labels).reshape(-1)
        class_null = torch.tensor([num_classes] * len(class_labels))
        class_labels_input = torch.cat([labels, class_null], 0)
        latent_model_input = torch.cat([latents] * 2)
        for t in scheduler.timesteps:
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
            timesteps = t[None].expand(latent_model_input.shape[0])
            eps = model(latent_model_input, timesteps, class_labels=class_labels_input).sample
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps], dim=0)
            latent_model_input = scheduler.step(eps, t, latent_model_input, use_clipped_model_output=True).prev_sample
        theirs = latent_model_input.chunk(2)[0]
    ours = ddim_sample(model, schedule, latents.shape, num_steps=10, x_T=latents, class_labels=class_labels,
                       guidance_scale=guidance_scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_trainer_trains_and_resumes_a_diffusers_unet2dmodel(tmp_path):
    """The kit's Trainer with diffusers' UNet2DModel as it is (its output is a UNet2DOutput), a checkpoint
    resumed exactly, and our DDIM sampler on the trained EMA model."""
    from torch.utils.data import TensorDataset
    from robust_diffusion.training.sampling import ddim_sample
    from robust_diffusion.training.trainer import TrainConfig, Trainer
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    schedule = rd.NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))
    config = TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2, progress=False)

    def trainer(steps, out):
        return Trainer(tiny_unet2d().train(), rd.RobustDiffusionLoss("ned", schedule, update="step"), TensorDataset(images),
                       schedule, TrainConfig(**{**config.__dict__, "steps": steps}), out_dir=out)

    straight = trainer(4, tmp_path / "straight").train()
    first = trainer(2, tmp_path / "resumed").train()
    resumed = trainer(4, tmp_path / "resumed")
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first.step == 2
    samples = ddim_sample(straight.ema, schedule, (2, 1, 8, 8), num_steps=5,
                          generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


def test_trainer_trains_a_class_conditional_unet2dmodel_with_label_dropout(tmp_path):
    """TrainConfig.conditional with diffusers' UNet2DModel(num_class_embeds=K + 1): its forward gets class_labels=,
    dropped labels are the last row (K), and the trained EMA model samples with guidance."""
    from diffusers import UNet2DModel
    from robust_diffusion.training.data import contaminate
    from robust_diffusion.training.sampling import ddim_sample
    from robust_diffusion.training.trainer import TrainConfig, Trainer
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, num_class_embeds=3 + 1)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                    with_kwargs=True)
    dataset = contaminate(torch.rand(16, 1, 8, 8) * 2 - 1, 0.0, labels=torch.arange(16) % 3)
    schedule = rd.NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))
    config = TrainConfig(steps=4, batch_size=8, log_every=1, progress=False, conditional=True, label_dropout=0.5)
    trainer = Trainer(model, rd.RobustDiffusionLoss("ned", schedule, update="step"), dataset, schedule, config,
                      out_dir=tmp_path).train()
    labels = torch.cat(seen[:4])  # the training steps' (the EMA copy holds the hook too)
    assert len(seen) == 4 and labels.shape == (32,) and set(labels.tolist()) == {0, 1, 2, 3} and trainer.null_label == 3
    samples = ddim_sample(trainer.ema, schedule, (3, 1, 8, 8), num_steps=5, class_labels=[0, 1, 2],
                          guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()


def test_a_model_that_returns_something_else_is_a_clear_error():
    from robust_diffusion.training.models import model_prediction
    x = torch.zeros(2, 1, 4, 4)
    assert model_prediction((x + 1,), x).eq(1).all()
    with pytest.raises(ValueError, match=r"tensor of its input's shape \(2, 1, 4, 4\).*got dict"):
        model_prediction({"out": x}, x)
    with pytest.raises(ValueError, match=r"got \(2, 4\)"):
        model_prediction(torch.zeros(2, 4), x)


# ---------------------------------------------------------------------------------------------- flow matching
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_noising_equals_the_schedulers_scale_noise(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = rd.schedule_from_diffusers(scheduler)
    assert isinstance(schedule, rd.FlowMatchingSchedule) and schedule.shift == shift
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    index = torch.tensor([0, 1, 400, 998, 999])
    sigma = scheduler.sigmas[index]  # our t is the scheduler's sigma (its timestep / num_train_timesteps)
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[index], noise)
    torch.testing.assert_close(schedule.q_sample(x0, sigma.double(), noise), theirs, rtol=1e-6, atol=1e-6)
    # The target of diffusers' SD3 / Flux training scripts: noise - x0.
    assert torch.equal(schedule.training_target(x0, noise, sigma.double()), noise - x0)


@pytest.mark.parametrize("scheme, options", [("uniform", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=1.2)),
                                             ("mode", dict(mode_scale=1.29))])
def test_flow_matching_timestep_density_equals_diffusers(scheme, options):
    """Our training times are diffusers' compute_density_for_timestep_sampling draw (same generator, bit for bit),
    shifted as the scheduler shifts its sigmas; the SD3 script then rounds them onto its 1000-step table, which a
    continuous schedule does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = rd.FlowMatchingSchedule.from_diffusers(scheduler, timestep_sampling=scheme, **options)
    ours = schedule.sample_timesteps(4096, generator=torch.Generator().manual_seed(5))
    u = compute_density_for_timestep_sampling(scheme, 4096, logit_mean=options.get("logit_mean"),
                                              logit_std=options.get("logit_std"),
                                              mode_scale=options.get("mode_scale"),
                                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, 3.0 * u.double() / (1 + 2.0 * u.double()))
    # The scheduler's own shifted table is the same map at its grid points.
    grid = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(schedule.shifted(grid), scheduler.sigmas.double(), rtol=1e-6, atol=1e-7)


def test_flow_matching_schedulers_that_cannot_be_mapped_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="dynamic shifting"):
        rd.schedule_from_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        rd.schedule_from_diffusers(FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    with pytest.raises(TypeError, match="for a flow-matching scheduler use rd.FlowMatchingSchedule.from_diffusers"):
        rd.NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler())


def test_a_diffusers_scheduler_is_taken_wherever_a_schedule_is():
    """The scheduler a diffusers user has, passed as it is to the module, the functions, the weightings, risk and
    the Trainer, gives what the mapped schedule gives; one that cannot be mapped is refused with the reason."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from robust_diffusion.training.trainer import TrainConfig, Trainer

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    mapped = rd.NoiseSchedule.from_diffusers(scheduler)
    x, y = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 150, 400, 650, 900, 999])
    ours, theirs = rd.RobustDiffusionLoss("ned", scheduler), rd.RobustDiffusionLoss("ned", mapped)
    assert ours.prediction_type == "v_prediction"
    torch.testing.assert_close(ours(x, y, t), theirs(x, y, t), rtol=0, atol=0)
    torch.testing.assert_close(rd.hellinger_loss(x, y, t, schedule=scheduler, scale="vlb"),
                               rd.hellinger_loss(x, y, t, schedule=mapped, scale="vlb"), rtol=0, atol=0)
    torch.testing.assert_close(rd.pseudo_huber_loss(x, y, t, c_schedule="snr", schedule=scheduler),
                               rd.pseudo_huber_loss(x, y, t, c_schedule="snr", schedule=mapped), rtol=0, atol=0)
    torch.testing.assert_close(rd.loss_weights(scheduler, t, "min_snr"), rd.loss_weights(mapped, t, "min_snr"))
    torch.testing.assert_close(rd.weight_table(scheduler, "p2"), rd.weight_table(mapped, "p2"))
    noised = rd.risk_noising(x, 0.1, t, y, schedule=scheduler, prediction_type="epsilon")
    torch.testing.assert_close(noised.noisy, rd.risk_noising(x, 0.1, t, y, schedule=mapped,
                                                             prediction_type="epsilon").noisy)
    assert rd.ned_loss(x, y, t, schedule=scheduler).isfinite()

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 1.0])
    module = rd.RobustDiffusionLoss("ned", flow, weighting="sigma_sqrt")
    assert module.prediction_type == "flow_prediction" and module(x, y, sigmas).isfinite()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\] .*got values in \[50, 1000\] \(diffusers' "
                                         r"flow-matching timesteps are sigma \* num_train_timesteps: pass the sigmas"):
        module(x, y, sigmas * 1000)
    trainer = Trainer(torch.nn.Conv2d(1, 1, 1), rd.RobustDiffusionLoss("ned", flow, update="step"),
                      torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4)), flow,
                      TrainConfig(steps=1, batch_size=4, progress=False))
    assert isinstance(trainer.schedule, rd.FlowMatchingSchedule) and trainer.schedule.shift == 3.0

    with pytest.raises(TypeError, match=r"^RobustDiffusionLoss: the diffusers scheduler "
                                        r"FlowMatchEulerDiscreteScheduler cannot be used as a schedule: .*dynamic "
                                        r"shifting"):
        rd.RobustDiffusionLoss("ned", FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(TypeError, match=r"^ned_loss: schedule must be a robust_diffusion schedule \(rd.NoiseSchedule, "
                                        r"rd.FlowMatchingSchedule, rd.EDMSchedule, ...\) or a diffusers scheduler, "
                                        r"got str"):
        rd.ned_loss(x, y, t, schedule="linear")


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_flow_matching_loss_weighting_equals_diffusers_sd3(scheme):
    """loss_weights on a FlowMatchingSchedule (flow_prediction, its default) equals compute_loss_weighting_for_sd3.
    (diffusers rounds sigma_sqrt to float32: 2e-7.) At sigma = 1 (log-SNR -inf) ours is the weight at the clamped
    log-SNR -30, within 1e-6 of the limit; at
    sigma = 0 diffusers' sigma_sqrt is inf and ours is finite. (diffusers' other schemes weigh every sample 1 in
    flow space: pass no weight; our "constant" is constant in epsilon space, (1 - t)^2 in flow space.)"""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    schedule = rd.FlowMatchingSchedule(shift=3.0)
    sigmas = torch.tensor([1e-3, 0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(rd.loss_weights(schedule, sigmas, scheme, dtype=torch.float64),
                               compute_loss_weighting_for_sd3(scheme, sigmas=sigmas).double(), rtol=2e-7, atol=0)
    one = torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(rd.loss_weights(schedule, one, scheme, dtype=torch.float64),
                               compute_loss_weighting_for_sd3(scheme, sigmas=one).double(), rtol=1e-6, atol=0)
    assert compute_loss_weighting_for_sd3("sigma_sqrt", sigmas=torch.zeros(1)).isinf().all()
    assert torch.isfinite(rd.loss_weights(schedule, torch.zeros(1, dtype=torch.float64), "sigma_sqrt")).all()


@pytest.mark.parametrize("shift, steps", [(1.0, 8), (3.0, 20)])
def test_flow_euler_sampler_equals_the_schedulers_step(shift, steps):
    """flow_sample on diffusers' sigmas is FlowMatchEulerDiscreteScheduler.step, call for call: the same model
    inputs (x and timestep = sigma * 1000) and the same result."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from robust_diffusion.training.sampling import flow_sample

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    schedule = rd.FlowMatchingSchedule.from_diffusers(scheduler)
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * 0.3
    calls = []

    def model(x, timestep):  # a velocity field that depends on x and t
        calls.append(timestep.clone())
        return torch.einsum("ij,bjhw->bihw", weight, x) * (1 + timestep.view(-1, 1, 1, 1) / 1000) - 0.2

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for timestep in scheduler.timesteps:
        x = scheduler.step(model(x, timestep.expand(2)), timestep, x).prev_sample
    theirs, their_calls = x, calls[:]
    calls.clear()
    ours = flow_sample(model, schedule, noise.shape, times=scheduler.sigmas, x_T=noise)
    assert len(calls) == len(their_calls) == steps
    for a, b in zip(calls, their_calls):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler_name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_edm_schedulers_map_exactly(scheduler_name):
    scheduler = getattr(diffusers, scheduler_name)(sigma_min=0.01, sigma_max=50.0, sigma_data=0.7)
    schedule = rd.schedule_from_diffusers(scheduler, p_mean=-1.0, p_std=1.4)
    assert isinstance(schedule, rd.EDMSchedule)
    assert (schedule.sigma_min, schedule.sigma_max, schedule.sigma_data, schedule.p_mean, schedule.p_std) == (
        0.01, 50.0, 0.7, -1.0, 1.4)
    with pytest.raises(TypeError, match="EDMSchedule.from_diffusers: expected an EDM scheduler"):
        rd.EDMSchedule.from_diffusers(DDPMScheduler())


def test_edm_preconditioned_loss_is_the_papers_in_float64():
    """EDM (Karras et al. 2022, eq. 2 and table 1): the loss lambda(sigma) ||D(x; sigma) - x0||^2 with
    lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 and D = c_skip x + c_out F (diffusers'
    precondition_outputs). Ours: the loss module on D with prediction_type "sample" and the "edm" weighting.
    It also equals the unweighted error of the raw network output F (lambda c_out^2 = 1)."""
    scheduler = diffusers.EDMEulerScheduler(sigma_data=0.7)
    schedule = rd.schedule_from_diffusers(scheduler)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 2, 4, 4, generator=generator, dtype=torch.float64)
    sigma = schedule.sample_timesteps(16, generator=generator)
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(16, 2, 4, 4, generator=generator, dtype=torch.float64)
    F = torch.randn(16, 2, 4, 4, generator=generator, dtype=torch.float64)  # the raw network output
    D = scheduler.precondition_outputs(x, F, sigma.view(-1, 1, 1, 1))
    module = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="edm", weighting_params={"sigma_data": 0.7},
                                    prediction_type="sample", reduction="none")
    ours = module(D, x0, sigma)
    lam = (sigma ** 2 + 0.7 ** 2) / (sigma * 0.7) ** 2
    paper = lam * (D - x0).square().flatten(1).mean(1)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, paper, rtol=1e-12, atol=0)
    c_skip, c_out = 0.7 ** 2 / (sigma ** 2 + 0.7 ** 2), sigma * 0.7 / (sigma ** 2 + 0.7 ** 2).sqrt()
    F_target = (x0 - c_skip.view(-1, 1, 1, 1) * x) / c_out.view(-1, 1, 1, 1)
    torch.testing.assert_close(ours, (F - F_target).square().flatten(1).mean(1), rtol=1e-10, atol=0)
