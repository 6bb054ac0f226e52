"""Timestep loss weights and pseudo-Huber c schedules (docs/DESIGN.md, Baselines and Weighting)."""

import math

import pytest
import torch

from robust_diffusion import weighting
from robust_diffusion.schedules import NoiseSchedule
from robust_diffusion.weighting import (LOG_SNR_BOUND, WEIGHTING_SCHEMES, loss_weights, pseudo_huber_c,
                                        weight_table)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# Every scheme, at its defaults and (where it has parameters) at other values.
SCHEME_PARAMS = [
    ("constant", {}), ("debias", {}), ("min_snr", {}), ("min_snr", {"gamma": 1.0}), ("p2", {}),
    ("p2", {"k": 0.5, "gamma": 0.5}), ("soft_min_snr", {}), ("soft_min_snr", {"gamma": 2.0}), ("sigmoid", {}),
    ("sigmoid", {"b": -1.5}), ("edm", {}), ("edm", {"sigma_data": 1.0}), ("trunc_snr", {}),
    ("max_snr", {"k": 5.0}), ("inv_snr", {}), ("sigma_sqrt", {}), ("cosmap", {}),
]
SCHEME_IDS = [name + "".join(f"-{k}{v:g}" for k, v in params.items()) for name, params in SCHEME_PARAMS]
assert {name for name, _ in SCHEME_PARAMS} == set(WEIGHTING_SCHEMES)


def closed_form_eps_weight(scheme, snr, params):
    """docs/DESIGN.md, Weighting's table, written directly in SNR (no log space)."""
    p = params
    return {
        "constant": lambda: torch.ones_like(snr),
        "debias": lambda: snr.rsqrt(),
        "min_snr": lambda: torch.clamp(p.get("gamma", 5.0) / snr, max=1.0),
        "p2": lambda: (p.get("k", 1.0) + snr) ** -p.get("gamma", 1.0),
        "soft_min_snr": lambda: p.get("gamma", 4.0) / (p.get("gamma", 4.0) + snr),
        "sigmoid": lambda: 1.0 / (1.0 + snr * math.exp(-p.get("b", 0.0))),
        "edm": lambda: 1.0 + 1.0 / (snr * p.get("sigma_data", 0.5) ** 2),
        "trunc_snr": lambda: torch.clamp(1.0 / snr, min=1.0),
        "max_snr": lambda: torch.clamp(p["k"] / snr, min=1.0),
        "inv_snr": lambda: 1.0 / snr,
        # SD3's flow weightings w_flow(s) at the flow sigma s = 1 / (1 + sqrt(SNR)), over (1 - s)^2 (eps space)
        "sigma_sqrt": lambda: (1.0 + snr.sqrt()) ** 4 / snr,
        "cosmap": lambda: (2.0 / (math.pi * (1.0 - 2.0 * flow_sigma(snr) + 2.0 * flow_sigma(snr) ** 2))
                           / (1.0 - flow_sigma(snr)) ** 2),
    }[scheme]()


def flow_sigma(snr):
    """The flow-matching time with this SNR: ((1 - s) / s)^2 = SNR."""
    return 1.0 / (1.0 + snr.sqrt())


def independent_linear_snr():
    """SNR of the default linear schedule by a plain float64 product (not the library's path)."""
    abar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    return abar / (1.0 - abar)


# ---------------------------------------------------------------------------------- DESIGN reference values
# docs/DESIGN.md, Weighting, linear schedule, T = 1000: t -> (debias w_eps, debias w_v, min_snr5 w_eps, min_snr5 w_v,
# p2(1,1) w_eps, p2(1,0.5) w_eps), as printed.
DESIGN_TABLE = {
    0: ("0.0100005", "0.0099995", "5.0005e-4", "5.0e-4", "1.0e-4", "0.0100"),
    99: ("0.338828", "0.303935", "0.574023", "0.514909", "0.102982", "0.320908"),
    499: ("3.42414", "0.269093", "1", "0.0785872", "0.921413", "0.959902"),
    999: ("157.407", "0.00635269", "1", "4.03583e-5", "0.99996", "0.99998"),
}
DESIGN_COLUMNS = [("debias", "epsilon", {}), ("debias", "v_prediction", {}), ("min_snr", "epsilon", {}),
                  ("min_snr", "v_prediction", {}), ("p2", "epsilon", {}), ("p2", "epsilon", {"gamma": 0.5})]


def significant_digits(text):
    return len(text.lower().split("e")[0].replace(".", "").lstrip("0"))


@pytest.mark.parametrize("column", range(len(DESIGN_COLUMNS)))
def test_design_reference_values(column):
    scheme, prediction_type, params = DESIGN_COLUMNS[column]
    schedule = NoiseSchedule.linear()
    t = torch.tensor(list(DESIGN_TABLE))
    ours = loss_weights(schedule, t, scheme, prediction_type, **params)
    assert ours.dtype == torch.float32 and ours.shape == (4,)

    # Against the closed form in SNR, to 1e-6 relative (w_v = w_eps * SNR / (SNR + 1)).
    snr = independent_linear_snr()[t]
    expected = closed_form_eps_weight(scheme, snr, params)
    if prediction_type == "v_prediction":
        expected = expected * snr / (snr + 1.0)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)

    # Against the printed table, to the digits it prints (six significant digits are a 5e-6 relative claim).
    for value, text in zip(ours.double().tolist(), (row[column] for row in DESIGN_TABLE.values())):
        digits = significant_digits(text)
        assert float(f"{value:.{digits - 1}e}") == float(text), (scheme, prediction_type, value, text)


def test_design_identities():
    schedule = NoiseSchedule.linear()
    for kind in PREDICTION_TYPES:
        torch.testing.assert_close(weight_table(schedule, "p2", kind, k=1.0, gamma=1.0),
                                   weight_table(schedule, "sigmoid", kind, b=0.0), rtol=1e-12, atol=0)
    assert f"{weight_table(schedule, 'debias').mean().item():.3g}" == "17.8"


@pytest.mark.parametrize("make_schedule", [NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.scaled_linear])
@pytest.mark.parametrize("scheme, params", SCHEME_PARAMS, ids=SCHEME_IDS)
def test_every_scheme_matches_its_closed_form(make_schedule, scheme, params):
    schedule = make_schedule()
    snr = schedule.snr
    w_eps = closed_form_eps_weight(scheme, snr, params)
    expected = {"epsilon": w_eps, "sample": w_eps * snr, "v_prediction": w_eps * snr / (snr + 1.0)}
    for kind in PREDICTION_TYPES:
        table = weight_table(schedule, scheme, kind, **params)
        assert table.dtype == torch.float64 and table.shape == (schedule.num_timesteps,)
        # cosmap's closed form (1 - 2s + 2s^2 at s near 1) loses a few more digits than the log-space library
        torch.testing.assert_close(table, expected[kind], rtol=1e-11 if scheme == "cosmap" else 1e-12, atol=0)


# ---------------------------------------------------------------------------------- parameterisation conversions
@pytest.mark.parametrize("scheme, params", SCHEME_PARAMS, ids=SCHEME_IDS)
def test_weights_convert_between_parameterisations(scheme, params):
    """One model error, seen in eps, x0 and v space: w_x0 MSE_x0 == w_v MSE_v == w_eps MSE_eps."""
    schedule = NoiseSchedule.linear()
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 10, 99, 250, 499, 750, 998, 999])
    x0 = torch.randn(len(t), 3, 5, 5, dtype=torch.float64, generator=generator)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
    eps_hat = eps + 0.1 * torch.randn(x0.shape, dtype=torch.float64, generator=generator)

    x_t = schedule.q_sample(x0, t, eps)
    a = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = (x_t - s * eps_hat) / a  # the x0 and v predictions implied by eps_hat
    v_hat = a * eps_hat - s * x0_hat

    def mse(prediction, target):
        return ((prediction - target) ** 2).flatten(1).mean(1)

    mse_eps, mse_x0, mse_v = mse(eps_hat, eps), mse(x0_hat, x0), mse(v_hat, schedule.velocity(x0, eps, t))
    snr = schedule.snr[t]
    torch.testing.assert_close(mse_x0, mse_eps / snr, rtol=1e-9, atol=0)
    torch.testing.assert_close(mse_v, mse_eps * (snr + 1) / snr, rtol=1e-9, atol=0)

    w = {kind: loss_weights(schedule, t, scheme, kind, dtype=torch.float64, **params) for kind in PREDICTION_TYPES}
    torch.testing.assert_close(w["sample"] * mse_x0, w["epsilon"] * mse_eps, rtol=1e-9, atol=0)
    torch.testing.assert_close(w["v_prediction"] * mse_v, w["epsilon"] * mse_eps, rtol=1e-9, atol=0)


def test_prediction_type_defaults_to_the_schedule_and_accepts_aliases():
    schedule = NoiseSchedule.linear(prediction_type="v_prediction")
    t = torch.tensor([3, 500, 999])
    expected = loss_weights(schedule, t, "min_snr", "v_prediction")
    torch.testing.assert_close(loss_weights(schedule, t, "min_snr"), expected, rtol=0, atol=0)
    torch.testing.assert_close(loss_weights(schedule, t, "min_snr", "v"), expected, rtol=0, atol=0)
    torch.testing.assert_close(loss_weights(schedule, t, "min_snr", "x0"),
                               loss_weights(schedule, t, "min_snr", "sample"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- edge cases
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


EDGE_SCHEDULES = ["fp16", "bf16", "zero-snr", "diffusers-fp16", "diffusers-bf16", "diffusers-zero-snr"]


def edge_schedule(name):
    """Schedules with +inf log-SNR (abar rounded to 1 in fp16/bf16) or -inf (zero terminal SNR): our own
    linear schedule (no diffusers needed) and, where diffusers is installed, DDPMScheduler's."""
    if name.startswith("diffusers-"):
        DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
        return {
            "diffusers-fp16": lambda: NoiseSchedule.from_alphas_cumprod(DDPMScheduler().alphas_cumprod.half()),
            "diffusers-bf16": lambda: NoiseSchedule.from_alphas_cumprod(DDPMScheduler().alphas_cumprod.bfloat16()),
            "diffusers-zero-snr": lambda: NoiseSchedule.from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True)),
        }[name]()
    return {
        "fp16": lambda: NoiseSchedule.from_alphas_cumprod(NoiseSchedule.linear().alphas_cumprod.half()),
        "bf16": lambda: NoiseSchedule.from_alphas_cumprod(NoiseSchedule.linear().alphas_cumprod.bfloat16()),
        "zero-snr": lambda: NoiseSchedule.linear(zero_terminal_snr=True),
    }[name]()


@pytest.mark.parametrize("terminal", ["clamp", "one"])
@pytest.mark.parametrize("name", EDGE_SCHEDULES)
def test_non_finite_log_snr_gives_finite_weights(name, terminal):
    schedule = edge_schedule(name)
    lam = schedule.log_snr()
    nonfinite = ~torch.isfinite(lam)
    assert nonfinite.any() and not lam.isnan().any()
    t = torch.arange(schedule.num_timesteps)
    low = int(lam.masked_fill(nonfinite, math.inf).argmin())  # the extreme finite log-SNR steps
    high = int(lam.masked_fill(nonfinite, -math.inf).argmax())
    for scheme, params in SCHEME_PARAMS:
        for kind in PREDICTION_TYPES:
            for normalize in (False, True):
                table = weight_table(schedule, scheme, kind, terminal=terminal, normalize=normalize, **params)
                assert torch.isfinite(table).all() and (table >= 0).all(), (scheme, params, kind, normalize)
            table = weight_table(schedule, scheme, kind, terminal=terminal, **params)
            if terminal == "one":
                assert (table[nonfinite] == 1).all()
            else:  # clamped to the extreme finite log-SNR of the schedule
                assert (table[lam == -math.inf] == table[low]).all()
                assert (table[lam == math.inf] == table[high]).all()
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                weights = loss_weights(schedule, t, scheme, kind, terminal=terminal, dtype=dtype, **params)
                assert weights.dtype == dtype and torch.isfinite(weights).all(), (scheme, params, kind, dtype)


def test_terminal_policies_agree_at_finite_log_snr():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True)
    for scheme, params in SCHEME_PARAMS:
        clamp = weight_table(schedule, scheme, terminal="clamp", **params)
        one = weight_table(schedule, scheme, terminal="one", **params)
        torch.testing.assert_close(clamp[:-1], one[:-1], rtol=0, atol=0)
    # The terminal step takes its neighbour's weight under "clamp": debias stays bounded in eps space.
    debias = weight_table(schedule, "debias")
    assert debias[-1] == debias[-2]
    assert math.isclose(debias[-2].item(), schedule.snr[-2].rsqrt().item(), rel_tol=1e-12)


def test_log_snr_bound_and_dtype_saturation():
    schedule = NoiseSchedule.from_alphas_cumprod(torch.tensor([1 - 1e-15, 0.5, 1e-16], dtype=torch.float64))
    assert schedule.log_snr()[0] > LOG_SNR_BOUND and schedule.log_snr()[-1] < -LOG_SNR_BOUND
    torch.testing.assert_close(weight_table(schedule, "inv_snr"),
                               torch.tensor([math.exp(-LOG_SNR_BOUND), 1.0, math.exp(LOG_SNR_BOUND)],
                                            dtype=torch.float64), rtol=1e-12, atol=0)
    half = loss_weights(schedule, torch.arange(3), "inv_snr", dtype=torch.float16)
    assert half.tolist() == [0.0, 1.0, torch.finfo(torch.float16).max]


def test_normalize_gives_mean_one():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True)
    t = torch.tensor([0, 17, 999])
    for scheme, params in SCHEME_PARAMS:
        for terminal in ("clamp", "one"):
            table = weight_table(schedule, scheme, "v", terminal=terminal, normalize=True, **params)
            assert abs(table.mean().item() - 1.0) < 1e-12
            plain = weight_table(schedule, scheme, "v", terminal=terminal, **params)
            torch.testing.assert_close(table, plain / plain.mean(), rtol=1e-15, atol=0)
            torch.testing.assert_close(
                loss_weights(schedule, t, scheme, "v", terminal=terminal, normalize=True, dtype=torch.float64,
                             **params), table[t], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- lookups and caching
def test_lookup_shapes_and_index_dtypes():
    schedule = NoiseSchedule.linear()
    table = weight_table(schedule, "min_snr")
    assert loss_weights(schedule, torch.empty(0, dtype=torch.long), "min_snr").shape == (0,)
    t = torch.tensor([5, 999, 0, 5, 123, 7], dtype=torch.int32)
    torch.testing.assert_close(loss_weights(schedule, t, "min_snr", dtype=torch.float64), table[t.long()],
                               rtol=0, atol=0)
    strided = t.long()[::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(loss_weights(schedule, strided, "min_snr", dtype=torch.float64), table[strided],
                               rtol=0, atol=0)
    assert not loss_weights(schedule, t, "min_snr").requires_grad


def test_tables_are_built_once_and_keyed_by_every_argument(monkeypatch):
    builds = []
    build = weighting._build_table
    monkeypatch.setattr(weighting, "_build_table", lambda schedule, key: builds.append(key) or build(schedule, key))
    schedule = NoiseSchedule.linear()
    t = torch.tensor([1, 2, 3])
    first = loss_weights(schedule, t, "min_snr", gamma=5.0)
    for _ in range(3):
        torch.testing.assert_close(loss_weights(schedule, t, "min_snr", gamma=5), first, rtol=0, atol=0)
    loss_weights(schedule, t, "min_snr", dtype=torch.float64)  # a new dtype copies, it does not rebuild
    weight_table(schedule, "min_snr")
    assert len(builds) == 1

    variants = [dict(scheme="min_snr", gamma=1.0), dict(scheme="min_snr", prediction_type="v"),
                dict(scheme="min_snr", normalize=True), dict(scheme="min_snr", terminal="one"), dict(scheme="p2")]
    for variant in variants:
        loss_weights(schedule, t, **variant)
    assert len(builds) == 1 + len(variants)
    loss_weights(NoiseSchedule.linear(), t, "min_snr")  # another schedule, another table
    assert len(builds) == 2 + len(variants)

    table = weight_table(schedule, "min_snr")
    table.fill_(-1.0)  # a copy: the cache is unaffected
    torch.testing.assert_close(loss_weights(schedule, t, "min_snr"), first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- torch.compile
COLD_CACHE_CALLS = {
    "pseudo_huber_c-snr": lambda schedule, t: pseudo_huber_c(schedule, t),
    "pseudo_huber_c-exponential": lambda schedule, t: pseudo_huber_c(schedule, t, 0.3, "exponential"),
    "min_snr": lambda schedule, t: loss_weights(schedule, t, "min_snr"),
    "debias-v-normalized": lambda schedule, t: loss_weights(schedule, t, "debias", "v", normalize=True),
    "p2-x0-one-fp16": lambda schedule, t: loss_weights(schedule, t, "p2", "x0", terminal="one", dtype=torch.float16,
                                                       k=0.5, gamma=0.5),
}


@pytest.mark.parametrize("name, backend", [("linear", "eager"), ("zero-snr", "eager"), ("fp16", "eager"),
                                           ("zero-snr", "aot_eager")])
@pytest.mark.parametrize("call", COLD_CACHE_CALLS)
def test_compile_fullgraph_from_a_cold_table_cache(call, name, backend):
    """fullgraph=True with no table cached yet: the table build is traced (no graph break, no host sync),
    gives the eager values and fills the cache, which later calls index."""
    schedule = NoiseSchedule.linear() if name == "linear" else edge_schedule(name)
    fn = COLD_CACHE_CALLS[call]
    inputs = [torch.tensor([0, 5, 500, 998, 999]), torch.tensor([999, 3, 3]), torch.tensor([17])]
    weighting._TABLES.clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fn(schedule, t), fullgraph=True, dynamic=True, backend=backend)
    got = [compiled(t) for t in inputs]
    assert weighting._TABLES.get(schedule), "the traced build fills the cache like an eager call"
    weighting._TABLES.clear()
    for t, value in zip(inputs, got):
        expected = fn(schedule, t)
        assert value.dtype == expected.dtype and torch.isfinite(value).all()
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_compile_inductor_from_a_cold_table_cache():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True)
    t = torch.tensor([0, 5, 500, 999])

    def fn(t):
        return loss_weights(schedule, t, "min_snr", "v", normalize=True) * pseudo_huber_c(schedule, t)

    weighting._TABLES.clear()
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, dynamic=True)(t)
    weighting._TABLES.clear()
    torch.testing.assert_close(got, fn(t), rtol=1e-6, atol=0)


def test_compiled_cold_build_still_refuses_weights_beyond_float64():
    schedule = NoiseSchedule.linear()
    t = torch.tensor([0, 999])
    with pytest.raises(ValueError, match="gives weights outside the float64 range"):
        loss_weights(schedule, t, "p2", k=1e-300, gamma=1000.0)
    weighting._TABLES.clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: loss_weights(schedule, t, "p2", k=1e-300, gamma=1000.0), fullgraph=True,
                             dynamic=True, backend="eager")
    with pytest.raises(RuntimeError, match="timestep weights outside the float64 range"):
        compiled(t)
    assert not weighting._TABLES.get(schedule), "a refused table is not cached"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lookup_matches_cpu():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True)
    t = torch.randint(0, 1000, (257,))
    for scheme, params in SCHEME_PARAMS:
        torch.testing.assert_close(loss_weights(schedule, t.cuda(), scheme, "v", **params).cpu(),
                                   loss_weights(schedule, t, scheme, "v", **params), rtol=0, atol=0)
    assert pseudo_huber_c(schedule, t.cuda()).device.type == "cuda"


# ---------------------------------------------------------------------------------- peers: diffusers
def diffusers_min_snr_weights(noise_scheduler, timesteps, snr_gamma):
    """The min-SNR lines of diffusers' examples/text_to_image/train_text_to_image.py."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif noise_scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


@pytest.mark.parametrize("zero_snr", [False, True], ids=["default", "zero-snr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [5.0, 1.0])
def test_min_snr_matches_diffusers(diffusers, prediction_type, zero_snr, snr_gamma):
    noise_scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    timesteps = torch.arange(noise_scheduler.config.num_train_timesteps)
    theirs = diffusers_min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    schedule = NoiseSchedule.from_diffusers(noise_scheduler)
    ours = loss_weights(schedule, timesteps, "min_snr", gamma=snr_gamma)
    assert torch.isfinite(ours).all()
    comparable = torch.isfinite(theirs) & torch.isfinite(schedule.log_snr())
    assert comparable.sum() >= len(timesteps) - 1
    torch.testing.assert_close(ours[comparable], theirs[comparable], rtol=1e-6, atol=0)
    if zero_snr:  # diffusers: eps 0/0 = NaN at t = T-1, v 0/(0+1) = 0; ours: the clamp policy, finite and tiny in v
        assert theirs[-1].isnan() if prediction_type == "epsilon" else theirs[-1] == 0
        if prediction_type == "v_prediction":
            assert 0 < ours[-1] < 1e-6


def diffusers_huber_c(noise_scheduler, timestep, huber_c, huber_schedule):
    """diffusers' examples/research_projects/scheduled_huber_loss_training (text_to_image) huber_c lines."""
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        huber_c = math.exp(-alpha * timestep)
    elif huber_schedule == "snr":
        alphas_cumprod = noise_scheduler.alphas_cumprod[timestep]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        huber_c = (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    elif huber_schedule == "constant":
        huber_c = huber_c
    return float(huber_c)


@pytest.mark.parametrize("zero_snr", [False, True], ids=["default", "zero-snr"])
@pytest.mark.parametrize("c", [0.1, 0.3])
@pytest.mark.parametrize("c_schedule", ["constant", "exponential", "snr"])
def test_pseudo_huber_c_matches_diffusers(diffusers, c_schedule, c, zero_snr):
    noise_scheduler = diffusers.DDPMScheduler(rescale_betas_zero_snr=zero_snr)
    timesteps = torch.arange(noise_scheduler.config.num_train_timesteps)
    theirs = torch.tensor([diffusers_huber_c(noise_scheduler, int(step), c, c_schedule) for step in timesteps],
                          dtype=torch.float32)
    ours = pseudo_huber_c(NoiseSchedule.from_diffusers(noise_scheduler), timesteps, c=c, c_schedule=c_schedule)
    assert ours.dtype == torch.float32 and ours.shape == timesteps.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    if c_schedule == "exponential":  # c^(t/T): 1 at t = 0, not yet c at t = T-1
        assert ours[0] == 1 and ours[-1] > c
    if zero_snr and c_schedule == "snr":
        assert ours[-1] == torch.tensor(c, dtype=torch.float32)


def test_pseudo_huber_c_default_is_snr_with_c_0_1():
    schedule = NoiseSchedule.linear()
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(pseudo_huber_c(schedule, t),
                               pseudo_huber_c(schedule, t, c=0.1, c_schedule="snr"), rtol=0, atol=0)
    sigma = schedule.sigmas[t]
    torch.testing.assert_close(pseudo_huber_c(schedule, t).double(), 0.9 / (1 + sigma) ** 2 + 0.1,
                               rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------------- errors
def test_bad_arguments_have_clear_messages():
    schedule = NoiseSchedule.linear()
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"scheme must be one of \[.*'min_snr'.*\], got 'min-snr'"):
        loss_weights(schedule, t, "min-snr")
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*got 'flow'"):
        loss_weights(schedule, t, "min_snr", "flow")
    with pytest.raises(ValueError, match=r"terminal must be one of \['clamp', 'one'\], got 'zero'"):
        loss_weights(schedule, t, "min_snr", terminal="zero")
    with pytest.raises(TypeError, match="normalize must be a bool"):
        loss_weights(schedule, t, "min_snr", normalize="yes")
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        loss_weights(schedule, t, "min_snr", dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^loss_weights: schedule must be a robust_diffusion schedule .* or a "
                                        r"diffusers scheduler, got object$"):
        loss_weights(object(), t, "min_snr")
    with pytest.raises(TypeError, match="t must hold integer timesteps"):
        loss_weights(schedule, t.float(), "min_snr")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        loss_weights(schedule, torch.tensor([1000]), "min_snr")


@pytest.mark.parametrize("scheme, params, message", [
    ("min_snr", {"gamma": 0.0}, r"gamma must be > 0 for scheme 'min_snr', got 0.0"),
    ("min_snr", {"gamma": -5}, r"gamma must be > 0 for scheme 'min_snr'"),
    ("soft_min_snr", {"gamma": -1.0}, r"gamma must be > 0 for scheme 'soft_min_snr'"),
    ("p2", {"gamma": -1.0}, r"gamma must be >= 0 for scheme 'p2'"),
    ("p2", {"k": 0.0}, r"k must be > 0 for scheme 'p2'"),
    ("edm", {"sigma_data": 0.0}, r"sigma_data must be > 0 for scheme 'edm'"),
    ("max_snr", {"k": -1.0}, r"k must be > 0 for scheme 'max_snr'"),
    ("max_snr", {}, r"scheme 'max_snr' needs the parameter 'k'"),
    ("min_snr", {"gama": 5.0},
     r"unknown parameter\(s\) \['gama'\] for scheme 'min_snr'; it takes parameters \['gamma'\]"),
    ("debias", {"gamma": 5.0}, r"unknown parameter\(s\) \['gamma'\] for scheme 'debias'; it takes no parameters"),
    ("min_snr", {"gamma": float("nan")}, r"gamma must be finite"),
])
def test_bad_scheme_parameters(scheme, params, message):
    with pytest.raises(ValueError, match=message):
        loss_weights(NoiseSchedule.linear(), torch.tensor([0]), scheme, **params)


def test_non_number_parameters_are_rejected():
    with pytest.raises(TypeError, match="gamma must be a real number, got Tensor"):
        weight_table(NoiseSchedule.linear(), "min_snr", gamma=torch.tensor(5.0))
    with pytest.raises(TypeError, match="c must be a real number, got str"):
        pseudo_huber_c(NoiseSchedule.linear(), torch.tensor([0]), c="0.1")


def test_bad_pseudo_huber_arguments():
    schedule = NoiseSchedule.linear()
    t = torch.tensor([0])
    with pytest.raises(ValueError,
                       match=r"c_schedule must be one of \['constant', 'exponential', 'snr'\], got 'cosine'"):
        pseudo_huber_c(schedule, t, c_schedule="cosine")
    with pytest.raises(ValueError, match=r"c must be > 0, got 0.0"):
        pseudo_huber_c(schedule, t, c=0.0, c_schedule="exponential")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        pseudo_huber_c(schedule, torch.tensor([-1]))


# ---------------------------------------------------------------------------------- continuous schedules
@pytest.mark.parametrize("scheme, params", SCHEME_PARAMS, ids=SCHEME_IDS)
def test_continuous_schedules_weight_from_log_snr_at_the_float_time(scheme, params):
    """On a continuous schedule the weights are the same scheme at schedule.log_snr(t), converted to the
    prediction type; flow-matching weights are w_eps (1 - t)^2 (MSE_flow = MSE_eps / (1 - t)^2)."""
    import robust_diffusion as rd

    flow = rd.FlowMatchingSchedule(shift=3.0)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98], dtype=torch.float64)
    snr = ((1 - t) / t) ** 2
    eps = closed_form_eps_weight(scheme, snr, params)
    torch.testing.assert_close(loss_weights(flow, t, scheme, "epsilon", dtype=torch.float64, **params), eps,
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(loss_weights(flow, t, scheme, dtype=torch.float64, **params), eps * (1 - t) ** 2,
                               rtol=1e-9, atol=0)
    vp = rd.ContinuousVPSchedule()
    t_vp = torch.tensor([0.01, 0.2, 0.6, 1.0], dtype=torch.float64)
    snr_vp = torch.exp(vp.log_snr(t_vp))
    torch.testing.assert_close(loss_weights(vp, t_vp, scheme, "v", dtype=torch.float64, **params),
                               closed_form_eps_weight(scheme, snr_vp, params) * snr_vp / (snr_vp + 1),
                               rtol=1e-9, atol=0)


@pytest.mark.parametrize("scheme, params", SCHEME_PARAMS, ids=SCHEME_IDS)
def test_flow_weights_are_finite_at_both_ends(scheme, params):
    import robust_diffusion as rd

    t = torch.tensor([0.0, 1e-12, 0.5, 1.0 - 1e-12, 1.0], dtype=torch.float64)
    for kind in ("epsilon", "sample", "flow"):
        for terminal in ("clamp", "one"):
            w = loss_weights(rd.FlowMatchingSchedule(), t, scheme, kind, terminal=terminal, **params)
            assert w.dtype == torch.float32 and bool(torch.isfinite(w).all()) and bool((w > 0).all()), (kind, w)


def test_continuous_weight_errors_name_the_argument():
    import robust_diffusion as rd

    flow, ve = rd.FlowMatchingSchedule(), rd.VESchedule()
    t = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="normalize=True averages over the T steps of a discrete schedule"):
        loss_weights(flow, t, "min_snr", normalize=True)
    with pytest.raises(ValueError, match="'v_prediction' is defined for VP processes"):
        loss_weights(ve, t, "min_snr", "v")
    with pytest.raises(ValueError, match="'flow_prediction' needs a flow-matching schedule"):
        loss_weights(ve, t, "min_snr", "flow")
    with pytest.raises(ValueError, match="scheme must be one of"):
        loss_weights(flow, t, "min-snr")
    with pytest.raises(ValueError, match=r"loss_weights: t must lie in \[0, 1\]"):
        loss_weights(flow, torch.tensor([1.5], dtype=torch.float64), "min_snr")
