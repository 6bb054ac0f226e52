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
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
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
    with pytest.raises(TypeError, match="RobustDiffusionLoss: schedule must be a discrete NoiseSchedule"):
        rd.RobustDiffusionLoss("ned", schedule)
