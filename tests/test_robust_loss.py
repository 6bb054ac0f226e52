"""RobustDiffusionLoss: every loss and scale preset, the adaptive per-bucket scale, state_dict,
TorchScript, torch.export and clear errors."""

import io

import pytest
import torch

import robust_diffusion as rd
from robust_diffusion.robust_loss import _average_over_ranks


def batch(n=16, seed=0, shape=(1, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randn(n, *shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, y, t


@pytest.mark.parametrize("loss", rd.LOSSES)
@pytest.mark.parametrize("scale", ["adaptive", "vlb", 0.5])
def test_every_loss_and_scale_trains(loss, scale):
    params = {"alpha": 0.3} if loss == "alpha" else {}
    module = rd.RobustDiffusionLoss(loss, scale=scale, weighting="min_snr", **params)
    x, y, t = batch()
    x.requires_grad_()
    out = module(x, y, t)
    out.backward()
    assert out.dim() == 0 and torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert module.last_influence.shape == (16,)


def test_fixed_scale_and_weighting_match_the_functional_api():
    schedule = rd.NoiseSchedule.linear()
    module = rd.RobustDiffusionLoss("ned", schedule, scale=0.7, weighting="debias")
    x, y, t = batch()
    expected = rd.ned_loss(x, y, t, scale=0.7, weight=rd.loss_weights(schedule, t, "debias"))
    torch.testing.assert_close(module(x, y, t), expected)


def test_vlb_scale_for_epsilon_is_the_schedule_lambda():
    schedule = rd.NoiseSchedule.linear()
    module = rd.RobustDiffusionLoss("hellinger", schedule, scale="vlb", dim_reduction="sum")
    x, y, t = batch()
    torch.testing.assert_close(module(x, y, t), rd.hellinger_loss(x, y, t, scale="vlb", dim_reduction="sum"))


def test_adaptive_scale_is_relative_to_the_typical_sample_per_bucket():
    torch.manual_seed(0)
    module = rd.RobustDiffusionLoss("ned", scale="adaptive", num_buckets=2, momentum=0.0, temperature=1.0)
    t = torch.tensor([100] * 8 + [900] * 8)
    x = torch.zeros(16, 64)
    # bucket 0 typical error 1, bucket 1 typical error 0.01: the same *relative* outlier in each
    noise = torch.randn(16, 64)
    noise = noise / noise.pow(2).mean(1, keepdim=True).sqrt()
    y = noise * torch.cat([torch.ones(8), torch.full((8,), 0.1)]).reshape(-1, 1)
    y[0] *= 4.0   # 16x the typical penalty in bucket 0
    y[8] *= 4.0   # 16x the typical penalty in bucket 1
    module(x, y, t)  # seeds and updates the buckets
    torch.testing.assert_close(module.bucket_penalty, torch.tensor([1.0, 0.01]), rtol=1e-5, atol=0)
    module(x, y, t)
    w = module.last_influence
    assert w[0] < 0.01 and w[8] < 0.01, "16x outliers are silenced at both noise levels"
    torch.testing.assert_close(w[1:8], w[9:16])  # same relative error, same weight, whatever the level


def test_adaptive_median_ignores_a_minority_of_outliers():
    module = rd.RobustDiffusionLoss("hellinger", num_buckets=1, momentum=0.0)
    x = torch.zeros(10, 32)
    y = torch.ones(10, 32)
    y[:4] *= 100.0  # 40% contamination
    module(x, y, torch.full((10,), 5))
    assert module.bucket_penalty.item() == pytest.approx(1.0)


def test_state_dict_round_trip_keeps_the_running_scale():
    module = rd.RobustDiffusionLoss("ned")
    for seed in range(3):
        module(*batch(seed=seed))
    restored = rd.RobustDiffusionLoss("ned")
    restored.load_state_dict(module.state_dict())
    assert bool(restored.initialized) and restored._seeded
    torch.testing.assert_close(restored.bucket_penalty, module.bucket_penalty)
    x, y, t = batch(seed=9)
    module.eval(), restored.eval()
    torch.testing.assert_close(restored(x, y, t), module(x, y, t))


def test_eval_mode_does_not_update_the_scale():
    module = rd.RobustDiffusionLoss("ned")
    module(*batch(seed=1))
    before = module.bucket_penalty.clone()
    module.eval()
    module(*batch(seed=2))
    assert torch.equal(before, module.bucket_penalty)


def test_normalize_influence_divides_by_the_mean_weight():
    x, y, t = batch()
    plain = rd.RobustDiffusionLoss("ned", scale=0.5)
    normalized = rd.RobustDiffusionLoss("ned", scale=0.5, normalize_influence=True)
    torch.testing.assert_close(normalized(x, y, t), plain(x, y, t) / plain.last_influence.mean())


def test_script_save_load_and_export():
    module = rd.RobustDiffusionLoss("pseudo_huber", c=0.2, c_schedule="snr", weighting="min_snr")
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x, y, t = batch()
    torch.testing.assert_close(loaded(x, y, t), module(x, y, t))

    adaptive = rd.RobustDiffusionLoss("ned")
    adaptive(*batch(seed=3))
    scripted_adaptive = torch.jit.script(adaptive)
    adaptive.eval(), scripted_adaptive.eval()
    torch.testing.assert_close(scripted_adaptive(x, y, t), adaptive(x, y, t))

    adaptive.eval()
    exported = torch.export.export(adaptive, (x, y, t))
    torch.testing.assert_close(exported.module()(x, y, t), adaptive(x, y, t))


def test_average_over_ranks_without_distributed_is_identity():
    medians = torch.tensor([1.0, float("nan"), 3.0])
    assert torch.equal(torch.isnan(_average_over_ranks(medians)), torch.isnan(medians))


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "l1"}, r"loss must be one of"),
    ({"loss": "ned", "alpha": 0.3}, r"unknown parameter\(s\) \['alpha'\] for loss 'ned'"),
    ({"scale": "auto"}, r"scale must be 'adaptive', 'vlb' or a non-negative float"),
    ({"temperature": 0.0}, r"temperature must be positive"),
    ({"momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
    ({"num_buckets": 0}, r"num_buckets must be a positive integer"),
    ({"weighting": "snr"}, r"scheme must be one of"),
    ({"prediction_type": "score"}, r"prediction_type must be one of"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rd.RobustDiffusionLoss(**kwargs)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_adaptive_state():
    torch._dynamo.reset()
    eager = rd.RobustDiffusionLoss("ned", weighting="min_snr")
    compiled_module = rd.RobustDiffusionLoss("ned", weighting="min_snr")
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=True)
    for seed in range(3):  # the first call seeds the buckets eagerly-equivalent in both
        x, y, t = batch(seed=seed)
        x.requires_grad_()
        expected = eager(x, y, t)
        got = compiled(x, y, t)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(compiled_module.bucket_penalty, eager.bucket_penalty)
        (g_expected,) = torch.autograd.grad(expected, x)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(g_got, g_expected)
