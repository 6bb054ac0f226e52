"""docs/INTEGRATION.md is executed: every recipe runs as written (real diffusers and accelerate, CPU), and every
row of its option table is checked against diffusers' functions or kohya sd-scripts' formulas re-created line
for line (sd-scripts is not a package; library/train_util.py: conditional_loss, get_huber_threshold_if_needed,
apply_snr_weight, apply_debiased_estimation)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import robust_diffusion as rd
from conftest import subprocess_pythonpath

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "INTEGRATION.md"


def recipes():
    """The python blocks of docs/INTEGRATION.md, each with the heading it stands under."""
    text = DOC.read_text()
    found = []
    for match in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        for block in re.findall(r"```python\n(.*?)```", match.group(2), flags=re.S):
            found.append(pytest.param(block, id=match.group(1).split(")")[0].strip("(")))
    return found


def test_the_document_has_the_five_recipes():
    assert [p.id for p in recipes()] == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("code", recipes())
def test_recipe_runs_as_written(code, tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# ---------------------------------------------------------------- kohya's formulas, line for line
def kohya_huber_c(huber_schedule, huber_c, huber_scale, timesteps, noise_scheduler):
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if huber_schedule == "snr":
        alphas_cumprod = torch.index_select(noise_scheduler.alphas_cumprod, 0, timesteps)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    return torch.full((timesteps.shape[0],), huber_c * huber_scale)


def kohya_conditional_loss(model_pred, target, loss_type, huber_c):
    if loss_type == "l2":
        return F.mse_loss(model_pred, target, reduction="none")
    huber_c = huber_c.view(-1, 1, 1, 1)
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c ** 2) - huber_c)
    return 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c ** 2) - huber_c)


def kohya_all_snr(noise_scheduler):
    alphas_cumprod = noise_scheduler.alphas_cumprod
    return (alphas_cumprod / (1.0 - alphas_cumprod)).float()


@pytest.mark.parametrize("loss_type", ["l2", "huber", "smooth_l1"])
@pytest.mark.parametrize("huber_schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("huber_scale", [1.0, 1.7])
def test_kohya_loss_types_and_huber_options(loss_type, huber_schedule, huber_scale):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    huber_c = kohya_huber_c(huber_schedule, 0.1, huber_scale, t, scheduler)
    theirs = kohya_conditional_loss(pred, target, loss_type, huber_c).mean([1, 2, 3])
    if loss_type == "l2":
        ours = rd.kl_loss(pred, target, reduction="none")
    else:
        ours = rd.pseudo_huber_loss(pred, target, t, c=0.1, c_schedule=huber_schedule, c_scale=huber_scale,
                                    form=loss_type, schedule=schedule, reduction="none")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kohya_min_snr_gamma_is_our_min_snr_weighting(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    t = torch.arange(1000)
    snr = kohya_all_snr(scheduler)[t]
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, 5.0))
    theirs = min_snr_gamma / (snr + 1) if prediction_type == "v_prediction" else min_snr_gamma / snr
    torch.testing.assert_close(rd.loss_weights(schedule, t, "min_snr", prediction_type, gamma=5.0), theirs,
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kohya_debiased_estimation_differs_as_documented(prediction_type):
    """docs/INTEGRATION.md: kohya caps SNR at 1000; for v prediction it uses 1/sqrt(SNR + 1) where we carry the
    epsilon-space 1/sqrt(SNR) into v space. Equal wherever neither difference applies."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    schedule = rd.NoiseSchedule.from_diffusers(scheduler)
    t = torch.arange(1000)
    snr = kohya_all_snr(scheduler)[t]
    capped = torch.minimum(snr, torch.full_like(snr, 1000.0))
    theirs = 1 / torch.sqrt(capped + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(capped)
    ours = rd.loss_weights(schedule, t, "debias", prediction_type)
    documented = torch.sqrt(snr) / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)
    torch.testing.assert_close(ours, documented, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":
        below = snr <= 1000
        assert below.sum() > 900 and (~below).any()
        torch.testing.assert_close(ours[below], theirs[below], rtol=1e-5, atol=0)
        assert (ours[~below] < theirs[~below]).all()
        assert ours[0].item() == pytest.approx(0.0100, abs=5e-5) and theirs[0].item() == pytest.approx(0.0316, abs=5e-5)


def test_diffusers_compute_snr_is_schedule_snr():
    from diffusers.training_utils import compute_snr
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(rd.NoiseSchedule.from_diffusers(scheduler).snr[t].float(), compute_snr(scheduler, t),
                               rtol=1e-5, atol=0)


def test_a_per_sample_loss_is_not_averaged_again():
    """The trap the document warns about, as PyTorch behaves: mean over dim=[] of a [B] loss averages the batch;
    kohya's .mean([1, 2, 3]) raises."""
    per_sample = rd.kl_loss(torch.randn(4, 3, 2, 2), torch.zeros(4, 3, 2, 2), reduction="none")
    assert per_sample.shape == (4,)
    assert per_sample.mean(dim=list(range(1, per_sample.ndim))).shape == ()
    with pytest.raises(IndexError):
        per_sample.mean([1, 2, 3])


def test_c_scale_needs_a_c_schedule():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="c_scale"):
        rd.pseudo_huber_loss(x, x, c=0.1, c_scale=2.0)
    with pytest.raises(ValueError, match="c_scale must be > 0"):
        rd.pseudo_huber_c(rd.NoiseSchedule.linear(), torch.tensor([1]), 0.1, "constant", c_scale=0.0)


def test_the_accelerate_recipe_moves_the_scale_once_per_optimizer_step_and_not_on_a_skipped_one():
    """Recipe (a)'s pattern under accelerate's gradient accumulation: the forward passes of a window only stage
    their statistics, the scale moves when the optimizer steps, and a window whose gradients are not finite (as a
    skipped fp16 step) leaves it as it was and is counted."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(torch.randn(64, 8), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    loss_fn = rd.RobustDiffusionLoss("ned", scheduler, num_buckets=1, update="step")
    history = []
    for index, clean in enumerate(loader):
        before = loss_fn.adaptive_scale.bucket_penalty.clone()
        t = torch.randint(0, 100, (clean.shape[0],))
        with accelerator.accumulate(model):
            prediction = model(clean)
            if index in (2, 3):  # the second window: its gradients are not finite
                prediction = prediction * float("nan")
            loss = loss_fn(prediction, torch.zeros_like(clean), t)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                if not torch.isfinite(grad_norm):  # skip the step, as fp16's grad scaler would
                    optimizer.zero_grad()
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            skipped = accelerator.optimizer_step_was_skipped or not torch.isfinite(grad_norm)
            skipped = skipped or index == 5  # the third window: as if fp16's grad scaler had skipped its step
            loss_fn.step(torch.tensor(not skipped))
        history.append((accelerator.sync_gradients, before, loss_fn.adaptive_scale.bucket_penalty.clone()))
    syncs = [sync for sync, _, _ in history]
    assert syncs == [False, True] * 4
    for sync, before, after in history:
        if not sync:
            assert torch.equal(before, after)  # a forward pass inside the window only staged its statistic
    assert not torch.equal(history[1][1], history[1][2])  # the first window moved the scale
    assert torch.equal(history[3][1], history[3][2])  # the non-finite window did not
    assert torch.equal(history[5][1], history[5][2])  # nor the skipped one, though its statistics were finite
    assert not torch.equal(history[7][1], history[7][2])  # the next one moves it again
    assert int(loss_fn.adaptive_scale.skipped_updates) == 3  # two refused statistics and one dropped window


def test_reduction_sum_is_a_sum_of_per_sample_means_and_the_element_sum_is_one_argument_away():
    x, y = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    per_sample = F.mse_loss(x, y, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(rd.kl_loss(x, y, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(rd.kl_loss(x, y, dim_reduction="sum", reduction="sum"), F.mse_loss(x, y, reduction="sum"))


def test_a_validation_call_needs_eval_mode_to_leave_the_running_scale_alone():
    x, y, t = torch.randn(8, 4), torch.zeros(8, 4), torch.arange(8) * 120
    for update in ("forward", "step"):
        loss_fn = rd.RobustDiffusionLoss("ned", update=update)
        loss_fn(x, y, t)
        loss_fn.step(torch.tensor(True))
        seeded = loss_fn.adaptive_scale.bucket_penalty.clone()
        with torch.no_grad():
            loss_fn(3 * x, y, t)  # train mode: the call enters the scale
        loss_fn.step(torch.tensor(True))
        assert not torch.equal(loss_fn.adaptive_scale.bucket_penalty, seeded), update
        moved = loss_fn.adaptive_scale.bucket_penalty.clone()
        loss_fn.eval()
        with torch.no_grad():
            loss_fn(3 * x, y, t)
        loss_fn.train()
        loss_fn.step(torch.tensor(True))
        assert torch.equal(loss_fn.adaptive_scale.bucket_penalty, moved), update
