"""RobustDiffusionLoss: every loss and scale preset, the adaptive per-bucket scale, state_dict,
TorchScript, torch.export and clear errors."""

import io

import pytest
import torch

import robust_diffusion as rd
from robust_diffusion.adaptive_scale import _average_over_ranks


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
    torch.testing.assert_close(module.adaptive_scale.bucket_penalty, torch.tensor([1.0, 0.01]), rtol=1e-5, atol=0)
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
    assert module.adaptive_scale.bucket_penalty.item() == pytest.approx(1.0)


def test_state_dict_round_trip_keeps_the_running_scale():
    module = rd.RobustDiffusionLoss("ned")
    for seed in range(3):
        module(*batch(seed=seed))
    restored = rd.RobustDiffusionLoss("ned")
    restored.load_state_dict(module.state_dict())
    assert bool(restored.adaptive_scale.initialized) and restored.adaptive_scale.seeded_on_host
    torch.testing.assert_close(restored.adaptive_scale.bucket_penalty, module.adaptive_scale.bucket_penalty)
    x, y, t = batch(seed=9)
    module.eval(), restored.eval()
    torch.testing.assert_close(restored(x, y, t), module(x, y, t))


def test_eval_mode_does_not_update_the_scale():
    module = rd.RobustDiffusionLoss("ned")
    module(*batch(seed=1))
    before = module.adaptive_scale.bucket_penalty.clone()
    module.eval()
    module(*batch(seed=2))
    assert torch.equal(before, module.adaptive_scale.bucket_penalty)


@pytest.mark.parametrize("loss", ["hellinger", "ned", "alpha", "js", "lecam", "tv"])
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_a_typical_sample_reads_influence_one(loss, temperature):
    """The reported weight is relative to a sample at its noise level's typical (median) penalty: that sample
    reads 1 (the raw phi'(1/temperature), e.g. NED's 0.44, is ``typical_influence``), an outlier near 0, an easier
    sample more than 1; the gradient itself is unchanged."""
    module = rd.RobustDiffusionLoss(loss, num_buckets=1, momentum=0.0, temperature=temperature)
    x = torch.zeros(5, 16)
    y = torch.ones(5, 16) * torch.tensor([0.5, 0.8, 1.0, 1.2, 20.0]).reshape(-1, 1)  # penalties 0.25 .. 400
    t = torch.full((5,), 10)
    module(x, y, t)  # seeds the scale at the median penalty, 1
    module(x, y, t)
    raw = rd.influence_weights(x, y, t, divergence=loss, scale=1.0 / temperature, **(
        {"alpha": module.alpha} if loss == "alpha" else {}))
    assert module.typical_influence == pytest.approx(float(raw[2]), rel=1e-6) and module.typical_influence < 1
    torch.testing.assert_close(module.last_influence, raw / module.typical_influence)
    assert module.last_influence[2] == pytest.approx(1.0, rel=1e-6)
    assert module.last_influence[4] < 0.05 and module.last_influence[0] > 1


def test_without_a_typical_sample_the_weights_are_reported_as_they_are():
    """A fixed or vlb scale defines no typical sample, and a loss that weighs every sample 1 has nothing to
    divide: there the reported weight is phi'(delta) (rd.influence_weights)."""
    x, y, t = batch()
    for module in (rd.RobustDiffusionLoss("ned", scale=0.5), rd.RobustDiffusionLoss("ned", scale="vlb"),
                   rd.RobustDiffusionLoss("kl"), rd.RobustDiffusionLoss("pseudo_huber")):
        assert module.typical_influence == 1.0
    module = rd.RobustDiffusionLoss("ned", scale=0.5)
    module(x, y, t)
    torch.testing.assert_close(module.last_influence, rd.influence_weights(x, y, t, divergence="ned", scale=0.5))
    # a clipped MSE that clips the typical penalty (tau 1 < delta 4) gives it no weight to divide by
    assert rd.RobustDiffusionLoss("clipped_mse", temperature=0.25).typical_influence == 1.0


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
    statistic = torch.tensor([1.0, 0.0, 3.0, 1.0, 0.0, 1.0, 1.0])
    assert _average_over_ranks(statistic) is statistic


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "l1"}, r"loss must be one of"),
    ({"loss": "ned", "alpha": 0.3}, r"unknown parameter\(s\) \['alpha'\] for loss 'ned'"),
    ({"scale": "auto"}, r"scale must be 'adaptive', 'vlb', 'batch' or a non-negative float"),
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
        torch.testing.assert_close(compiled_module.adaptive_scale.bucket_penalty, eager.adaptive_scale.bucket_penalty)
        (g_expected,) = torch.autograd.grad(expected, x)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(g_got, g_expected)


@pytest.mark.slow
def test_compiled_forward_and_step_and_an_exported_training_module_keep_the_eager_state():
    """The state update is two operators (one mutating the buffers in place): a fullgraph-compiled training step
    (forward + step with a skipped step among them) and a module exported in training mode update the state
    exactly as eager mode does."""
    torch._dynamo.reset()
    eager, compiled_module = (rd.RobustDiffusionLoss("ned", update="step") for _ in range(2))

    def train_step(x, y, t, ok):
        loss = compiled_module(x, y, t)
        compiled_module.step(ok)
        return loss

    compiled = torch.compile(train_step, fullgraph=True)
    for seed in range(5):
        x, y, t = batch(seed=seed)
        ok = torch.tensor(seed != 2)
        expected = eager(x, y, t)
        eager.step(ok)
        torch.testing.assert_close(compiled(x, y, t, ok), expected)
        for name in ("bucket_penalty", "initialized", "skipped_updates", "limited_updates"):
            assert torch.equal(getattr(compiled_module.adaptive_scale, name), getattr(eager.adaptive_scale, name)), \
                (seed, name)
    assert int(eager.adaptive_scale.skipped_updates) == 1

    module, reference = rd.RobustDiffusionLoss("hellinger"), rd.RobustDiffusionLoss("hellinger")
    module(*batch(seed=0)), reference(*batch(seed=0))
    exported = torch.export.export(module, batch(seed=1)).module()
    for seed in range(1, 4):
        torch.testing.assert_close(exported(*batch(seed=seed)), reference(*batch(seed=seed)))
        assert torch.equal(exported.adaptive_scale.bucket_penalty, reference.adaptive_scale.bucket_penalty), seed


def test_scripted_module_keeps_loaded_state_on_its_first_call():
    """TorchScript does not run _load_from_state_dict, so the host flag says "not seeded"; the first call
    must still keep the loaded buckets (changing them only by the usual EMA update), like the eager module."""
    trained = rd.RobustDiffusionLoss("ned", num_buckets=4)
    for seed in range(3):
        trained(*batch(seed=seed))
    state = trained.state_dict()
    x, y, t = batch(seed=7)
    y = y * 10.0  # a batch whose own medians (what re-seeding would write) are far from the loaded state

    eager = rd.RobustDiffusionLoss("ned", num_buckets=4)
    eager.load_state_dict(state)
    scripted = torch.jit.script(rd.RobustDiffusionLoss("ned", num_buckets=4))
    # A scripted module lists the non-persistent constant tables among its state keys; they are rebuilt
    # by the constructor, not loaded.
    result = scripted.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["huber_c", "timestep_weight", "vlb_scale"] and not result.unexpected_keys
    torch.testing.assert_close(scripted(x, y, t), eager(x, y, t))
    torch.testing.assert_close(scripted.adaptive_scale.bucket_penalty, eager.adaptive_scale.bucket_penalty, rtol=1e-6, atol=0)
    reseeded = rd.RobustDiffusionLoss("ned", num_buckets=4)
    reseeded(x, y, t)
    assert not torch.allclose(scripted.adaptive_scale.bucket_penalty, reseeded.adaptive_scale.bucket_penalty, rtol=0.5)

    frozen = torch.jit.script(rd.RobustDiffusionLoss("ned", num_buckets=4))
    frozen.load_state_dict(state, strict=False)
    frozen.eval()  # no EMA update: the first call must leave the loaded state bit for bit
    eager.load_state_dict(state)
    eager.eval()
    torch.testing.assert_close(frozen(x, y, t), eager(x, y, t))
    assert torch.equal(frozen.adaptive_scale.bucket_penalty, state["adaptive_scale.bucket_penalty"]) and bool(frozen.adaptive_scale.initialized)


def test_a_fresh_scripted_module_still_seeds_from_its_first_batch():
    x, y, t = batch(seed=4)
    eager = rd.RobustDiffusionLoss("hellinger", num_buckets=3)
    scripted = torch.jit.script(rd.RobustDiffusionLoss("hellinger", num_buckets=3))
    torch.testing.assert_close(scripted(x, y, t), eager(x, y, t))
    torch.testing.assert_close(scripted.adaptive_scale.bucket_penalty, eager.adaptive_scale.bucket_penalty, rtol=1e-6, atol=0)
    assert not torch.equal(scripted.adaptive_scale.bucket_penalty, torch.ones(3))


def test_prediction_types_give_one_loss_for_one_model_error():
    """One model error seen in epsilon, x0 and v space (converted explicitly in float64): with the vlb
    scale and min-SNR weighting (both converted to the prediction type) every space gives the same loss."""
    schedule = rd.NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 10, 99, 250, 499, 750, 998, 999])
    shape = (len(t), 3, 4, 4)
    x0 = torch.randn(shape, dtype=torch.float64, generator=g)
    eps = torch.randn(shape, dtype=torch.float64, generator=g)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1.0 - abar).sqrt()
    vlb = schedule.vlb_weight[t]
    # error sizes that put delta = vlb * MSE_eps between about 0.2 and 3, where Hellinger's transform bends
    size = (torch.linspace(0.3, 3.0, len(t), dtype=torch.float64) / vlb).sqrt().view(-1, 1, 1, 1)
    eps_hat = eps + size * torch.randn(shape, dtype=torch.float64, generator=g)
    x_t = a * x0 + s * eps
    x0_hat = (x_t - s * eps_hat) / a
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    pairs = {"epsilon": (eps_hat, eps), "sample": (x0_hat, x0), "v_prediction": (v_hat, v)}

    losses = {}
    for kind, (prediction, target) in pairs.items():
        module = rd.RobustDiffusionLoss("hellinger", schedule, scale="vlb", weighting="min_snr",
                                        prediction_type=kind, reduction="none")
        losses[kind] = module(prediction.float(), target.float(), t)

    # The epsilon-space loss against the formula: min(1, 5 / SNR) * 4 (1 - exp(-delta / 4)).
    snr = schedule.snr[t]
    delta = vlb * (eps_hat - eps).pow(2).flatten(1).mean(1)
    assert 0.1 < delta.min() and delta.max() < 4
    expected = torch.clamp(5.0 / snr, max=1.0) * 4.0 * (1.0 - torch.exp(-delta / 4.0))
    torch.testing.assert_close(losses["epsilon"].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["sample"], losses["epsilon"], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["v_prediction"], losses["epsilon"], rtol=1e-5, atol=0)


def test_normalize_weights_divides_the_timestep_weights_by_their_mean():
    schedule = rd.NoiseSchedule.linear()
    x, y, t = batch()
    plain = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="debias", reduction="none")
    normalized = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="debias", reduction="none",
                                        normalize_weights=True)
    mean_weight = rd.weight_table(schedule, "debias").mean()
    assert 17 < mean_weight < 18.5  # docs/DESIGN.md, Weighting: the debias weights average 17.8 on this schedule
    torch.testing.assert_close(normalized(x, y, t), plain(x, y, t) / mean_weight.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(normalized.timestep_weight.double().mean(), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(normalized.timestep_weight,
                               rd.loss_weights(schedule, torch.arange(1000), "debias", normalize=True), rtol=0, atol=0)
    # The default leaves the weights as they are.
    torch.testing.assert_close(plain.timestep_weight, rd.weight_table(schedule, "debias").float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        rd.RobustDiffusionLoss("kl", weighting="debias", normalize_weights="yes")


def test_timestep_weights_saturate_at_the_float32_range():
    """p2 with a tiny k and a large gamma exceeds float32 at high noise: the module's weights saturate
    (as loss_weights does) instead of becoming inf."""
    schedule = rd.NoiseSchedule.linear()
    params = {"k": 1e-6, "gamma": 10.0}
    float32_max = torch.finfo(torch.float32).max
    assert rd.weight_table(schedule, "p2", **params).max() > float32_max  # float64 holds it, float32 does not
    module = rd.RobustDiffusionLoss("kl", schedule, scale=1.0, weighting="p2", weighting_params=params)
    assert torch.isfinite(module.timestep_weight).all()
    assert module.timestep_weight.max() == float32_max
    torch.testing.assert_close(module.timestep_weight, rd.loss_weights(schedule, torch.arange(1000), "p2", **params),
                               rtol=0, atol=0)
    x, y, _ = batch()
    assert torch.isfinite(module(x, y, torch.full((16,), 10))).all()


def test_compile_fullgraph_from_a_cold_table_cache():
    """The functional losses with per-sample c and weights, compiled with fullgraph=True when no table is
    cached yet: the table build is traced instead of breaking the graph."""
    from robust_diffusion import weighting

    schedule = rd.NoiseSchedule.linear(zero_terminal_snr=True)

    def step(x, y, t):
        return rd.pseudo_huber_loss(x, y, t, c=0.2, c_schedule="snr", schedule=schedule,
                                    weight=rd.loss_weights(schedule, t, "min_snr", "v"))

    batches = [batch(seed=seed) for seed in range(2)]
    weighting._TABLES.clear()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    got = [compiled(*b) for b in batches]
    assert len(weighting._TABLES[schedule]) >= 2, "the traced build fills the cache like an eager call"
    weighting._TABLES.clear()
    for b, value in zip(batches, got):
        torch.testing.assert_close(value, step(*b), rtol=1e-6, atol=0)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_small_batches_train_and_the_adaptive_state_converges(batch_size):
    """Fine-tuning batches of 1-4 samples leave most buckets without a sample in any one step: each bucket still
    converges to the typical penalty at its noise level (here it falls 150x from t = 0 to t = 999)."""
    g = torch.Generator().manual_seed(batch_size)
    module = rd.RobustDiffusionLoss("hellinger")

    def draw(t):
        residual = torch.randn(t.shape[0], 64, generator=g) * torch.exp(-t.double() / 400).float().unsqueeze(1)
        return residual, torch.zeros_like(residual)

    for _ in range(2400 // batch_size):
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        loss = module(*draw(t), t)
        assert torch.isfinite(loss) and torch.isfinite(module.last_influence).all()
    buckets = torch.arange(10)
    typical = torch.stack([draw(torch.randint(100 * k, 100 * k + 100, (4000,), generator=g))[0].pow(2).mean(1)
                           .median() for k in buckets])
    ratio = module.adaptive_scale.bucket_penalty / typical
    assert ((ratio > 0.67) & (ratio < 1.5)).all(), ratio
    assert int(module.adaptive_scale.skipped_updates) == 0
