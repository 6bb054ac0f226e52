"""The Schedule interface (docs/DESIGN.md, Schedules): every process implements it, the generic forward process
matches the closed forms, and a schedule written outside the library works with the risk module through it."""

import math

import pytest
import torch

import robust_diffusion as rd
from robust_diffusion import risk as rk

SCHEDULES = {
    "discrete": rd.NoiseSchedule.linear(),
    "vp": rd.ContinuousVPSchedule(),
    "cosine-vp": rd.CosineVPSchedule(),
    "ve": rd.VESchedule(),
    "edm": rd.EDMSchedule(sigma_max=80.0),
    "flow": rd.FlowMatchingSchedule(shift=3.0, timestep_sampling="logit_normal"),
}


def _times(schedule, batch=6):
    return schedule.sample_timesteps(batch, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_process_is_a_schedule_with_consistent_answers(name):
    schedule = SCHEDULES[name]
    assert isinstance(schedule, rd.Schedule) and schedule.discrete == (name == "discrete")
    t = _times(schedule)
    assert t.dtype == (torch.int64 if schedule.discrete else torch.float64)
    alpha, sigma = schedule.coefficients(t, torch.float64)
    alpha = torch.ones_like(sigma) if alpha is None else alpha
    # log SNR is log(alpha^2 / sigma^2) at the same times, whatever the process.
    torch.testing.assert_close(schedule.log_snr(t), torch.log(alpha.square() / sigma.square()), rtol=1e-10, atol=0)
    # Generic forward process and targets.
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 2, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, 3, generator=g,
                                                                                  dtype=torch.float64)
    expected = alpha.reshape(-1, 1, 1) * x0 + sigma.reshape(-1, 1, 1) * noise
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(schedule.training_target(x0, noise, t, "epsilon"), noise)
    assert torch.equal(schedule.training_target(x0, noise, t, "x0"), x0)
    if schedule.process == "vp":
        torch.testing.assert_close(schedule.training_target(x0, noise, t, "v"),
                                   alpha.reshape(-1, 1, 1) * noise - sigma.reshape(-1, 1, 1) * x0)
    else:
        with pytest.raises(ValueError, match="'v_prediction' is defined for VP processes"):
            schedule.training_target(x0, noise, t, "v")
    # The stability bound: past it SNR q < 1, the draw respects it, and min_snr is the end of the range.
    q = torch.tensor([0.0, 0.01, 0.5, 2.0], dtype=torch.float64)
    bound = schedule.lower_time_bound(q)
    assert bool(schedule.has_time_after(bound).all())
    drawn = schedule.sample_timesteps_above(bound, torch.Generator().manual_seed(2))
    assert bool((drawn >= bound).all()) and bool((torch.exp(schedule.log_snr(drawn)) * q < 1).all())
    assert schedule.min_snr() >= 0


def test_cosine_vp_is_the_limit_of_the_discrete_cosine_schedule():
    discrete, continuous = rd.NoiseSchedule.cosine(1000), rd.CosineVPSchedule()
    steps = torch.arange(0, 950)  # before the discrete betas reach their 0.999 cap
    at = (steps + 1).double() / 1000  # abar_k = f((k + 1) / T) / f(0), the product of the uncapped betas
    torch.testing.assert_close(continuous.coefficients(at, torch.float64)[0].square(), discrete.alphas_cumprod[steps],
                               rtol=1e-9, atol=1e-12)
    bound = continuous.lower_time_bound(torch.tensor([0.5, 4.0], dtype=torch.float64))
    torch.testing.assert_close(continuous.log_snr(bound).exp() * torch.tensor([0.5, 4.0], dtype=torch.float64),
                               torch.ones(2, dtype=torch.float64))  # SNR q = 1 exactly at the bound
    assert continuous.min_snr() < 1e-30
    with pytest.raises(ValueError, match="CosineVPSchedule: s must be positive"):
        rd.CosineVPSchedule(s=0.0)


def test_noise_schedule_log_snr_is_the_table_without_t_and_per_sample_with_it():
    schedule = SCHEDULES["discrete"]
    table = schedule.log_snr()
    assert table.shape == (1000,) and table.dtype == torch.float64
    t = torch.tensor([0, 5, 999])
    assert torch.equal(schedule.log_snr(t), table[t])
    with pytest.raises(ValueError, match=r"log_snr: t must lie in \[0, 1000\)"):
        schedule.log_snr(torch.tensor([1000]))


class QuarterCircleSchedule(rd.Schedule):
    """A schedule written outside the library: the cosine VP process alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    on t in (0, 1], answered in closed form."""

    def check_timesteps(self, t, argument="t", *, caller=None):
        if not t.dtype.is_floating_point or t.dim() != 1:
            raise TypeError(f"{caller}: {argument} must be a 1-D float tensor")
        return t

    def coefficients(self, t, dtype=torch.float32, *, caller=None):
        self.check_timesteps(t, caller=caller)
        angle = 0.5 * math.pi * t.double()
        return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)

    def log_snr(self, t):
        return -2.0 * torch.log(torch.tan(0.5 * math.pi * t.double()))

    def sample_timesteps(self, batch_size, device=None, generator=None):
        return self.sample_timesteps_above(torch.zeros(batch_size, dtype=torch.float64, device=device), generator)

    def lower_time_bound(self, q):  # cot^2(pi t / 2) q < 1  <=>  t > (2 / pi) atan(sqrt(q))
        return 2.0 / math.pi * torch.atan(torch.sqrt(q))

    def has_time_after(self, bound):
        return bound < 1.0

    def sample_timesteps_above(self, lower, generator=None):
        u = torch.rand(lower.shape, generator=generator, dtype=torch.float64, device=lower.device)
        return 1.0 - u * (1.0 - lower)

    def min_snr(self):
        return 0.0


def test_a_user_schedule_works_with_the_risk_module():
    schedule = QuarterCircleSchedule()
    risk = torch.tensor([0.0, 0.3, 1.0, 3.0])
    t = rk.sample_timesteps(schedule, risk, generator=torch.Generator().manual_seed(0))
    assert bool((t > rk.timestep_lower_bound(schedule, risk)).all()) and bool(rk.usable_samples(schedule, risk).all())
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    noising = rk.risk_noising(x, risk, t, noise, schedule=schedule)
    alpha, sigma = schedule.coefficients(t)
    # r = 0: the clean process exactly; every sample inside its interval: the risk-free loss is finite.
    torch.testing.assert_close(noising.noisy[0], alpha[0] * x[0] + sigma[0] * noise[0])
    assert torch.isfinite(rk.risk_free_loss(torch.zeros_like(x), noising, t, loss="ned", schedule=schedule))
    with pytest.raises(TypeError, match=r"^sample_timesteps: schedule must be a robust_diffusion schedule .* or a "
                                        r"diffusers scheduler, got object$"):
        rk.sample_timesteps(object(), risk)


@pytest.mark.parametrize("sampling", rd.continuous.FLOW_TIMESTEP_SAMPLING)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_truncated_draws_follow_the_training_distribution_past_the_bound(sampling, shift):
    """sample_timesteps_above (the risk module's draw) is the training distribution conditioned on t > lower:
    its quantiles match those of sample_timesteps' draws that land past the bound (60,000 draws each)."""
    schedule = rd.FlowMatchingSchedule(shift=shift, timestep_sampling=sampling)
    free = schedule.sample_timesteps(60000, generator=torch.Generator().manual_seed(0))
    for lower in (0.0, 0.3, 0.8):
        above = schedule.sample_timesteps_above(torch.full((60000,), lower, dtype=torch.float64),
                                                torch.Generator().manual_seed(1))
        assert bool((above > lower).all()) and bool((above <= 1).all())
        kept = free[free > lower]
        levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        torch.testing.assert_close(torch.quantile(above, levels), torch.quantile(kept, levels), rtol=0, atol=0.012)


def test_flow_schedule_refuses_bad_settings_by_name():
    for kwargs, message in ((dict(shift=0.0), "shift must be a positive number"),
                            (dict(timestep_sampling="cosmap"), "timestep_sampling must be one of"),
                            (dict(logit_std=0.0), "logit_mean must be finite and logit_std positive"),
                            (dict(mode_scale=2.0), r"mode_scale must lie in \(-1, 1.7519\)")):
        with pytest.raises(ValueError, match="FlowMatchingSchedule: " + message):
            rd.FlowMatchingSchedule(**kwargs)
    schedule = rd.FlowMatchingSchedule()
    with pytest.raises(ValueError, match=r"q_sample: t must lie in \[0, 1\]"):
        schedule.q_sample(torch.zeros(2, 3), torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match=r"RobustDiffusionLoss: schedule must be a robust_diffusion schedule "
                                        r"\(rd.NoiseSchedule, rd.FlowMatchingSchedule, rd.EDMSchedule, ...\) or a "
                                        r"diffusers scheduler, got str"):
        rd.RobustDiffusionLoss("ned", "flow")


# ---------------------------------------------------------------------------------------------- the loss module
CONTINUOUS = {"flow": lambda: rd.FlowMatchingSchedule(shift=3.0, timestep_sampling="logit_normal"),
              "vp": lambda: rd.ContinuousVPSchedule(), "edm": lambda: rd.EDMSchedule()}


def _continuous_batch(schedule, seed=0, batch=12):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 2, 4, 4, generator=generator), torch.randn(batch, 2, 4, 4, generator=generator)
    y[0] += 6.0  # an outlier
    return x, y, schedule.sample_timesteps(batch, generator=generator).float()


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
@pytest.mark.parametrize("loss, weighting", [("ned", "constant"), ("hellinger", "min_snr"), ("kl", "soft_min_snr"),
                                             ("pseudo_huber", "constant")])
def test_the_loss_module_on_a_continuous_schedule_is_the_operator_at_the_weights_of_t(name, loss, weighting):
    schedule = CONTINUOUS[name]()
    x, y, t = _continuous_batch(schedule)
    module = rd.RobustDiffusionLoss(loss, schedule, scale=0.7, weighting=weighting)
    weight = rd.loss_weights(schedule, t, weighting) if weighting != "constant" else None
    extra = (rd.pseudo_huber_c(schedule, t), "huber") if loss == "pseudo_huber" else ()
    expected = getattr(torch.ops.robust_diffusion, f"{loss}_loss")(x, y, torch.full((12,), 0.7), weight, "mean",
                                                                    "mean", *extra)
    torch.testing.assert_close(module(x, y, t), expected[0])
    torch.testing.assert_close(module.last_influence, expected[2])


def test_continuous_adaptive_buckets_are_equal_ranges_of_log_snr():
    flow, vp, edm = (CONTINUOUS[name]() for name in ("flow", "vp", "edm"))
    module = rd.RobustDiffusionLoss("ned", flow)
    assert rd.BUCKET_LOG_SNR_RANGE == (-10.0, 10.0) and module.num_buckets == 10
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    buckets = module.buckets(t)
    assert buckets[0] == 0 and buckets[-1] == 9 and bool((buckets.diff() >= 0).all())  # clean to pure noise
    # One bucket is one noise level: lambda in [10 - 2(k + 1), 10 - 2k) is bucket k, whatever the process.
    lam = torch.tensor([9.5, 3.3, 0.5, -0.5, -7.9, -30.0], dtype=torch.float64)
    expected = [0, 3, 4, 5, 8, 9]
    flow_t = torch.sigmoid(-lam / 2)  # log((1 - t) / t)^2 = lambda
    assert module.buckets(flow_t).tolist() == expected
    assert rd.RobustDiffusionLoss("ned", edm).buckets(torch.exp(-lam / 2)).tolist() == expected
    vp_module = rd.RobustDiffusionLoss("ned", vp, num_buckets=10)
    grid = torch.linspace(1e-3, 1, 20001, dtype=torch.float64)
    nearest = lambda target: grid[(vp.log_snr(grid) - target).abs().argmin()]  # noqa: E731
    assert vp_module.buckets(torch.stack([nearest(v) for v in lam[:5]])).tolist() == expected[:5]


def test_the_continuous_adaptive_state_trains_and_refuses_poison():
    schedule = CONTINUOUS["flow"]()
    module = rd.RobustDiffusionLoss("ned", schedule, temperature=0.5)
    for seed in range(3):
        module(*_continuous_batch(schedule, seed))
    assert bool(module.adaptive_scale.initialized) and torch.isfinite(module.adaptive_scale.bucket_penalty).all()
    state = module.adaptive_scale.bucket_penalty.clone()
    x, y, t = _continuous_batch(schedule, 5)
    x[3, 0, 0, 0] = float("nan")
    module(x, y, t)
    assert torch.equal(module.adaptive_scale.bucket_penalty, state) and int(module.adaptive_scale.skipped_updates) == 1
    # The outlier of every batch gets the lowest influence weight.
    module(*_continuous_batch(schedule, 6))
    assert int(module.last_influence.argmin()) == 0


def test_continuous_loss_under_torch_compile_fullgraph_and_torch_export_matches_eager():
    schedule = CONTINUOUS["flow"]()
    eager = rd.RobustDiffusionLoss("hellinger", schedule, weighting="cosmap")
    compiled_module = rd.RobustDiffusionLoss("hellinger", schedule, weighting="cosmap")
    compiled = torch.compile(compiled_module, fullgraph=True)
    for seed in range(2):
        batch = _continuous_batch(schedule, seed)
        torch.testing.assert_close(compiled(*batch), eager(*batch))
    torch.testing.assert_close(compiled_module.adaptive_scale.bucket_penalty, eager.adaptive_scale.bucket_penalty)
    eager.eval()
    batch = _continuous_batch(schedule, 7)
    exported = torch.export.export(eager, batch)
    torch.testing.assert_close(exported.module()(*batch), eager(*batch))
    with pytest.raises(TypeError, match=r"RobustDiffusionLoss: TorchScript supports discrete schedules only"):
        torch.jit.script(eager)


@pytest.mark.parametrize("build, call, error, message", [
    (lambda s: rd.RobustDiffusionLoss("ned", s, scale="vlb"), None, ValueError,
     r"scale='vlb' is DDPM's lambda_t of a discrete schedule"),
    (lambda s: rd.RobustDiffusionLoss("ned", s, weighting="min_snr", normalize_weights=True), None, ValueError,
     r"normalize_weights=True averages over the T steps"),
    (lambda s: rd.RobustDiffusionLoss("ned", s, prediction_type="v_prediction"), None, ValueError,
     r"RobustDiffusionLoss: prediction_type 'v_prediction' is defined for VP processes"),
    (lambda s: rd.RobustDiffusionLoss("ned", rd.NoiseSchedule.linear(), prediction_type="flow"), None, ValueError,
     r"RobustDiffusionLoss: prediction_type 'flow_prediction' needs a flow-matching schedule"),
    (lambda s: rd.RobustDiffusionLoss("ned", s, weighting="p2", gamma=-1.0), None, ValueError, r"gamma"),
    (lambda s: rd.RobustDiffusionLoss("ned", s), lambda m, x, y: m(x, y, torch.arange(12)), TypeError,
     r"RobustDiffusionLoss: t must hold the continuous schedule's float times, got dtype torch.int64"),
    (lambda s: rd.RobustDiffusionLoss("ned", s), lambda m, x, y: m(x, y, torch.full((12,), 1.5)), ValueError,
     r"RobustDiffusionLoss: t must lie in \[0, 1\] for a continuous schedule, got values in \[1.5, 1.5\]"),
    (lambda s: rd.RobustDiffusionLoss("ned", s), lambda m, x, y: m(x, y, torch.rand(11)), ValueError,
     r"RobustDiffusionLoss: t must be a 1-D tensor with one timestep per sample"),
], ids=["vlb", "normalize", "v on flow", "flow on discrete", "bad weighting param", "int t", "t out of range",
        "t length"])
def test_continuous_loss_refuses_bad_settings_and_times_in_one_line(build, call, error, message):
    schedule = CONTINUOUS["flow"]()
    x, y, _ = _continuous_batch(schedule)
    with pytest.raises(error, match=message) as raised:
        module = build(schedule)
        call(module, x, y)
    assert "\n" not in str(raised.value)


def test_pseudo_huber_c_on_continuous_schedules():
    flow, edm = rd.FlowMatchingSchedule(), rd.EDMSchedule()
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    c = rd.pseudo_huber_c(flow, t, 0.1, "snr")
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
    torch.testing.assert_close(c.double(), 0.9 * (1 - t) ** 2 + 0.1)  # sigma / alpha = t / (1 - t)
    torch.testing.assert_close(rd.pseudo_huber_c(flow, t, 0.1, "exponential", 2.0).double(), 0.1 ** t * 2.0)
    assert torch.equal(rd.pseudo_huber_c(flow, t, 0.2, "constant", 0.5), torch.full((5,), 0.1))
    # The same function of the noise level as the discrete table: equal log-SNR, equal c.
    discrete = rd.NoiseSchedule.linear()
    steps = torch.tensor([0, 250, 999])
    same_level = torch.sigmoid(-discrete.log_snr(steps) / 2)
    torch.testing.assert_close(rd.pseudo_huber_c(flow, same_level), rd.pseudo_huber_c(discrete, steps))
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(rd.pseudo_huber_c(edm, sigma, 0.1).double(), 0.9 / (1 + sigma) ** 2 + 0.1)
    with pytest.raises(ValueError, match="pseudo_huber_c: c_schedule 'exponential' needs a time in \\[0, 1\\]"):
        rd.pseudo_huber_c(edm, sigma, 0.1, "exponential")
    with pytest.raises(ValueError, match=r"pseudo_huber_c: t must lie in \[0, 1\]"):
        rd.pseudo_huber_c(flow, torch.tensor([1.5]))
