"""Risk-sensitive diffusion (docs/DESIGN.md, Risk): the risk_noising operator against a float64 reference, bit
identity with the standard pipeline at r = 0, Monte-Carlo marginals, the closed-form optimum of the risk-free
targets, the stability-interval samplers, the risk-free loss, registration and error messages."""

from __future__ import annotations

import math

import pytest
import torch

import robust_diffusion as rd
from robust_diffusion import risk as rk

OP = torch.ops.robust_diffusion.risk_noising
KINDS = ["epsilon", "score", "sample", "v_prediction"]


def reference(x, r, eta, alpha, sigma, kind, perturbation):
    """float64 risk-sensitive noising in plain torch (r per element or per sample)."""
    x, eta = x.double(), eta.double()
    B, D = x.shape[0], x[0].numel()
    view = (B,) + (1,) * (x.dim() - 1)
    r = r.double().reshape(view) if r.dim() == 1 and x.dim() > 1 else r.double()
    a = torch.ones(view, dtype=torch.float64) if alpha is None else alpha.double().reshape(view)
    s = sigma.double().reshape(view)
    c = 1.0 if perturbation == "gaussian" else (D + 2.0) / (D + 5.0)
    rc2 = c * r * r
    v = torch.sqrt(torch.clamp(s * s - a * a * rc2, min=0.0))
    noisy = a * x + v * eta
    eps = s / v * eta
    x0 = x - a * rc2 * eta / v
    targets = {"epsilon": eps, "score": -eta / v, "sample": x0, "v_prediction": a * eps - s * x0}
    return noisy, targets[kind], v if r.shape == x.shape else v.reshape(B)


def make_case(shape, seed, per_element, dtype=torch.float64, vp=True, device="cpu"):
    """Risks well inside the stability interval (v / sigma >= 0.3)."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eta = torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = 0.3 + torch.rand(B, generator=g, dtype=torch.float64) * 2
    alpha = torch.sqrt(1.0 - torch.rand(B, generator=g, dtype=torch.float64) * 0.9) if vp else None
    a = torch.ones(B, dtype=torch.float64) if alpha is None else alpha
    r_max = 0.9 * sigma / a  # alpha r <= 0.9 sigma
    r_shape = shape if per_element else (B,)
    r = torch.rand(r_shape, generator=g, dtype=torch.float64) * r_max.reshape((B,) + (1,) * (len(r_shape) - 1))
    r = r * (torch.rand(r_shape, generator=g) > 0.2)  # some exact zeros
    cast = lambda v: None if v is None else v.to(device, dtype)  # noqa: E731
    return cast(x), cast(r), cast(eta), cast(alpha), cast(sigma)


# --------------------------------------------------------------------------- the operator vs float64
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("perturbation", ["gaussian", "cauchy"])
@pytest.mark.parametrize("per_element", [True, False], ids=["per_element", "per_sample"])
@pytest.mark.parametrize("shape", [(1, 7), (5, 3, 4, 5), (6,), (3, 20001)], ids=str)
def test_operator_matches_float64_reference(kind, perturbation, per_element, shape, device):
    for vp in (True, False):
        x, r, eta, alpha, sigma = make_case(shape, seed=sum(shape), per_element=per_element, vp=vp, device=device)
        noisy, target, v = OP(x, r, eta, alpha, sigma, kind, perturbation)
        ref = reference(x.cpu(), r.cpu(), eta.cpu(), None if alpha is None else alpha.cpu(), sigma.cpu(), kind,
                        perturbation)
        for got, want in zip((noisy, target, v), ref):
            assert got.shape == want.shape and got.dtype == torch.float64
            torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_against_float64(dtype, kind, device):
    x, r, eta, alpha, sigma = make_case((4, 3, 9, 7), seed=3, per_element=True, dtype=dtype, device=device)
    alpha, sigma, r = alpha.float(), sigma.float(), r.float()
    noisy, target, v = OP(x, r, eta, alpha, sigma, kind, "gaussian")
    assert noisy.dtype == target.dtype == dtype and v.dtype == torch.float32
    want = reference(x.cpu(), r.cpu(), eta.cpu(), alpha.cpu(), sigma.cpu(), kind, "gaussian")
    # float32 arithmetic on the rounded inputs, then one rounding to the storage type
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, ref in zip((noisy, target, v), want):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()) / 4)


def test_non_contiguous_inputs(device):
    x, r, eta, alpha, sigma = make_case((4, 6, 5), seed=4, per_element=True, device=device)
    got = OP(x.transpose(1, 2), r.transpose(1, 2), eta.transpose(1, 2), alpha, sigma, "sample", "gaussian")
    want = OP(x.transpose(1, 2).contiguous(), r.transpose(1, 2).contiguous(), eta.transpose(1, 2).contiguous(),
              alpha, sigma, "sample", "gaussian")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_empty_batch():
    x = torch.empty(0, 3)
    noisy, target, v = OP(x, torch.empty(0), x, torch.empty(0), torch.empty(0), "epsilon", "gaussian")
    assert noisy.shape == (0, 3) and v.shape == (0,)


# --------------------------------------------------------------------------- r = 0: the standard pipeline
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_zero_risk_is_bit_identical_to_the_standard_pipeline(dtype, device):
    schedule = rd.NoiseSchedule.linear()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 7, 5, generator=g).to(device, dtype)
    eta = torch.randn(8, 3, 7, 5, generator=g).to(device, dtype)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999], device=device)
    for risk in (torch.zeros(8, device=device), torch.zeros_like(x)):
        for kind, want in (("epsilon", eta), ("sample", x), ("v_prediction", schedule.velocity(x, eta, t))):
            out = rk.risk_noising(x, risk, t, eta, schedule=schedule, prediction_type=kind)
            assert torch.equal(out.noisy, schedule.q_sample(x, t, eta)), kind
            assert torch.equal(out.target, want), kind
            v = out.noise_std.reshape(8, 1, 1, 1) if out.noise_std.dim() == 1 else out.noise_std
            assert torch.equal(v.expand_as(x), out.clean_std.reshape(8, 1, 1, 1).to(v.dtype).expand_as(x))
        score = rk.risk_noising(x, risk, t, eta, schedule=schedule, prediction_type="score").target
        sigma = schedule.gather("sqrt_one_minus_alphas_cumprod", t, torch.promote_types(dtype, torch.float32))
        assert torch.equal(score, (-eta / sigma.reshape(8, 1, 1, 1)).to(dtype))


def test_zero_risk_elements_inside_a_risky_sample_stay_standard():
    x, r, eta, alpha, sigma = make_case((3, 500), seed=6, per_element=True, dtype=torch.float32)
    noisy, target, _ = OP(x, r, eta, alpha, sigma, "epsilon", "gaussian")
    clean = r == 0
    assert clean.any() and (~clean).any()
    standard = alpha[:, None] * x + sigma[:, None] * eta
    assert torch.equal(noisy[clean], standard[clean]) and torch.equal(target[clean], eta[clean])


@pytest.mark.parametrize("loss", ["kl", "hellinger", "ned", "huber"])
def test_risk_free_loss_at_zero_risk_equals_the_standard_loss_bitwise(loss):
    schedule = rd.NoiseSchedule.linear()
    x, eta = torch.randn(6, 2, 8, 8), torch.randn(6, 2, 8, 8)
    t = rk.sample_timesteps(schedule, torch.zeros(6), generator=torch.Generator().manual_seed(0))
    out = rk.risk_noising(x, torch.zeros(6), t, eta, schedule=schedule)
    prediction = (0.9 * eta + 0.2 * torch.randn_like(eta)).requires_grad_()
    got = rk.risk_free_loss(prediction, out, t, loss=loss, schedule=schedule, weighting="min_snr")
    (got_grad,) = torch.autograd.grad(got, prediction)
    weight = rd.loss_weights(schedule, t, "min_snr")
    fn = rd.huber_loss if loss == "huber" else (lambda *a, **k: rd.divergence_loss(loss, *a, **k))
    want = fn(prediction, eta, t, schedule=schedule, weight=weight)
    (want_grad,) = torch.autograd.grad(want, prediction)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("schedule", [rd.NoiseSchedule.linear(), rd.NoiseSchedule.cosine(7),
                                      rd.NoiseSchedule.linear(1, beta_start=0.5, beta_end=0.5)],
                         ids=["linear1000", "cosine7", "T1"])
@pytest.mark.parametrize("batch", [1, 5, 4096])
def test_zero_risk_sampler_draws_the_standard_timesteps_bitwise(schedule, batch):
    """Same generator, r = 0: risk.sample_timesteps and NoiseSchedule.sample_timesteps give the same stream."""
    for seed in (0, 1, 12345):
        g_risk, g_standard = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for risk in (torch.zeros(batch), torch.zeros(batch, 3, 2)):  # per sample and per element
            got = rk.sample_timesteps(schedule, risk, generator=g_risk)
            want = schedule.sample_timesteps(batch, generator=g_standard)
            assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want)
        # and the generators are left in the same state
        assert torch.equal(g_risk.get_state(), g_standard.get_state())
    t = schedule.sample_timesteps(batch, generator=torch.Generator().manual_seed(3))
    assert t.shape == (batch,) and int(t.min()) >= 0 and int(t.max()) < schedule.num_timesteps


def test_standard_sampler_is_floor_of_a_float64_uniform():
    """The trainer's draw (floor(u T), u ~ U[0, 1) in float64) is NoiseSchedule.sample_timesteps's, and it is
    uniform: every step of a short schedule is hit about equally often."""
    schedule = rd.NoiseSchedule.cosine(7)
    u = torch.rand(70_000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t = schedule.sample_timesteps(70_000, generator=torch.Generator().manual_seed(9))
    assert torch.equal(t, torch.floor(u * 7).long())
    counts = torch.bincount(t, minlength=7).double()
    assert counts.numel() == 7 and ((counts - 10_000).abs() < 5 * math.sqrt(10_000 * 6 / 7)).all()


# --------------------------------------------------------------------------- Monte-Carlo marginals
def test_gaussian_risk_noising_matches_the_clean_marginal():
    """x0 ~ N(m, s^2), x~ = x0 + r n with per-sample r: x_t has the clean mean and variance; naive noising of x~
    is off by abar E[r^2]."""
    schedule = rd.NoiseSchedule.linear()
    g = torch.Generator().manual_seed(7)
    n, m, s = 400_000, 0.7, 0.6
    x0 = m + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64) * 1.2
    noisy_sample = x0 + r[:, None] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    t = torch.full((n,), 300)
    abar = schedule.alphas_cumprod[300].item()
    assert 1 - abar * (1 + 1.2 ** 2) > 0  # every r inside the stability interval
    eta = torch.randn(n, 1, generator=g, dtype=torch.float64)
    risky = rk.risk_noising(noisy_sample, r, t, eta, schedule=schedule).noisy
    clean = schedule.q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64))
    naive = schedule.q_sample(noisy_sample, t, eta)
    clean_var = abar * s * s + 1 - abar
    se_var = clean_var * math.sqrt(2.0 / n)
    assert abs(risky.mean().item() - math.sqrt(abar) * m) < 4 * math.sqrt(clean_var / n)
    assert abs(risky.var().item() - clean_var) < 4 * se_var
    assert abs(clean.var().item() - clean_var) < 4 * se_var
    excess = abar * (1.2 ** 2 / 3)  # abar E[r^2], r ~ U(0, 1.2)
    assert abs(naive.var().item() - clean_var - excess) < 4 * se_var and excess > 20 * se_var


# --------------------------------------------------------------------------- the closed-form optimum
def _least_squares(target: torch.Tensor, noisy: torch.Tensor):
    """(slope, intercept) of target on noisy, and their standard errors."""
    design = torch.stack([noisy, torch.ones_like(noisy)], dim=1)
    coef = torch.linalg.lstsq(design, target[:, None]).solution.squeeze(1)
    residual_var = (target - design @ coef).var()
    se = torch.sqrt(residual_var * torch.linalg.inv(design.T @ design).diagonal())
    return coef, se


@pytest.mark.parametrize("process", ["vp", "ve", "edm"])
def test_risk_free_targets_give_the_clean_optimal_denoiser(process):
    """Gaussian data x0 ~ N(m, s^2): E[target | x_t] is the clean optimum, linear in x_t; least squares over
    many risk-perturbed samples recovers its coefficients, while the naive targets do not."""
    g = torch.Generator().manual_seed(8)
    n, m, s = 1_000_000, 0.5, 0.8
    if process == "vp":
        schedule, t_value = rd.NoiseSchedule.linear(), 250
        t = torch.full((n,), t_value)
    elif process == "ve":
        schedule = rd.VESchedule()
        t = torch.full((n,), 0.5, dtype=torch.float64)
    else:
        schedule = rd.EDMSchedule()
        t = torch.full((n,), 1.5, dtype=torch.float64)
    alpha, sigma = schedule.coefficients(t[:1], dtype=torch.float64)
    a, sg = (1.0 if alpha is None else alpha.item()), sigma.item()
    r = torch.rand(n, generator=g, dtype=torch.float64) * (0.85 * sg / a)  # v / sigma >= 0.5
    r = r * (torch.rand(n, generator=g) < 0.7)  # 30% clean samples
    x0 = m + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    sample = x0 + r[:, None] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eta = torch.randn(n, 1, generator=g, dtype=torch.float64)
    total_var = a * a * s * s + sg * sg
    slope_eps = sg / total_var  # E[eps | x_t] = sg / total_var (x_t - a m)
    optimum = {
        "epsilon": (slope_eps, -slope_eps * a * m),
        "score": (-1.0 / total_var, a * m / total_var),
        "sample": (a * s * s / total_var, m - a * s * s / total_var * a * m),
    }
    for kind, (slope, intercept) in optimum.items():
        out = rk.risk_noising(sample, r, t, eta, schedule=schedule, prediction_type=kind)
        got, se = _least_squares(out.target[:, 0], out.noisy[:, 0])
        assert abs(got[0].item() - slope) < 5 * se[0].item(), (kind, got, slope, se)
        assert abs(got[1].item() - intercept) < 5 * se[1].item(), (kind, got, intercept, se)
    # the naive pipeline (standard noising of x~, standard target) is biased for the same data
    naive_noisy = a * sample + sg * eta
    naive, se = _least_squares(eta[:, 0], naive_noisy[:, 0])
    assert abs(naive[0].item() - slope_eps) > 20 * se[0].item()


def test_v_prediction_target_is_consistent_with_epsilon_and_sample():
    schedule = rd.NoiseSchedule.cosine()
    x, r, eta, _, _ = make_case((5, 40), seed=9, per_element=True)
    r = r * 0.3
    t = rk.sample_timesteps(schedule, r, generator=torch.Generator().manual_seed(1))
    outs = {k: rk.risk_noising(x, r, t, eta, schedule=schedule, prediction_type=k) for k in
            ("epsilon", "sample", "v_prediction")}
    a, s = (c.reshape(5, 1) for c in schedule.coefficients(t, torch.float64))
    torch.testing.assert_close(outs["v_prediction"].target, a * outs["epsilon"].target - s * outs["sample"].target)
    # x0_target = (x_t - sigma eps_target) / alpha
    torch.testing.assert_close(outs["sample"].target, (outs["sample"].noisy - s * outs["epsilon"].target) / a)


# --------------------------------------------------------------------------- process coefficients, closed forms
def test_ve_coefficients_against_the_closed_form():
    """VE: alpha = 1 and sigma = sqrt(sigma_t^2 - sigma_min^2), sigma_t = sigma_min (sigma_max / sigma_min)^t."""
    sigma_min, sigma_max = 0.02, 80.0
    times = [1e-5, 0.1, 0.37, 0.5, 0.9, 1.0]
    schedule = rd.VESchedule(sigma_min, sigma_max)
    alpha, sigma = schedule.coefficients(torch.tensor(times, dtype=torch.float64), dtype=torch.float64)
    assert alpha is None
    want = [math.sqrt((sigma_min * (sigma_max / sigma_min) ** t) ** 2 - sigma_min ** 2) for t in times]
    torch.testing.assert_close(sigma, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)
    assert sigma[-1].item() == pytest.approx(math.sqrt(80.0 ** 2 - 0.02 ** 2), rel=1e-12)  # t = 1: sigma_max


def test_continuous_vp_coefficients_against_the_integrated_beta():
    """VP SDE: alpha = exp(-B(t) / 2), sigma = sqrt(1 - exp(-B(t))) with B(t) the integral of beta(s) from 0 to t,
    here integrated numerically (the trapezoid rule is exact for the linear beta)."""
    beta_min, beta_max = 0.1, 20.0
    times = [1e-3, 0.05, 0.259, 0.5, 0.8, 1.0]
    alpha, sigma = rd.ContinuousVPSchedule(beta_min, beta_max).coefficients(torch.tensor(times, dtype=torch.float64),
                                                                            dtype=torch.float64)
    for t, a, s in zip(times, alpha.tolist(), sigma.tolist()):
        grid = torch.linspace(0.0, t, 2001, dtype=torch.float64)
        integrated = torch.trapezoid(beta_min + (beta_max - beta_min) * grid, grid).item()
        assert a == pytest.approx(math.exp(-integrated / 2), rel=1e-10)
        assert s == pytest.approx(math.sqrt(1.0 - math.exp(-integrated)), rel=1e-10)
    # t = 1 with the defaults: B = 0.1 + 19.9 / 2 = 10.05
    assert alpha[-1].item() == pytest.approx(math.exp(-10.05 / 2), rel=1e-12)


def test_edm_coefficients_are_sigma_itself():
    sigmas = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    alpha, sigma = rd.EDMSchedule().coefficients(sigmas, dtype=torch.float64)
    assert alpha is None and torch.equal(sigma, sigmas)


# --------------------------------------------------------------------------- stability interval and samplers
def test_continuous_vp_t_min_for_unit_risk():
    bound = rk.timestep_lower_bound(rd.ContinuousVPSchedule(0.1, 20.0), torch.tensor([1.0, 0.0]))
    assert round(bound[0].item(), 4) == 0.2590 and bound[1].item() == 0.0
    alpha, sigma = rd.ContinuousVPSchedule().coefficients(bound[:1], torch.float64)
    assert sigma.item() ** 2 == pytest.approx(alpha.item() ** 2 * 1.0, rel=1e-12)  # v = 0 exactly at t_min


@pytest.mark.parametrize("schedule", [rd.ContinuousVPSchedule(), rd.VESchedule(), rd.EDMSchedule()], ids=repr)
@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_continuous_bounds_are_where_v_vanishes(schedule, margin):
    risk = torch.tensor([0.05, 0.3, 1.0, 2.5], dtype=torch.float64)
    bound = rk.timestep_lower_bound(schedule, risk, margin=margin)
    alpha, sigma = schedule.coefficients(bound, torch.float64)
    a = 1.0 if alpha is None else alpha
    # at the bound: v^2 = sigma^2 - alpha^2 r^2 equals margin * sigma^2
    torch.testing.assert_close((sigma ** 2 - a ** 2 * risk ** 2), margin * sigma ** 2, rtol=1e-9, atol=1e-12)
    t = rk.sample_timesteps(schedule, risk.repeat(500), margin=margin, generator=torch.Generator().manual_seed(2))
    assert (t > bound.repeat(500)).all()
    alpha, sigma = schedule.coefficients(t, torch.float64)
    a = 1.0 if alpha is None else alpha
    assert (sigma ** 2 - a ** 2 * risk.repeat(500) ** 2 > margin * sigma ** 2).all()


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_discrete_bound_is_the_first_stable_step(margin):
    schedule = rd.NoiseSchedule.linear()
    risk = torch.tensor([0.0, 0.01, 0.2, 1.0, 5.0, 100.0])
    bound = rk.timestep_lower_bound(schedule, risk, margin=margin)
    snr = schedule.snr
    for r, b in zip(risk.double().tolist(), bound.tolist()):
        stable = (snr * r * r < 1 - margin).nonzero()
        assert b == (stable[0].item() if r > 0 else 0)
    t = rk.sample_timesteps(schedule, risk.repeat(2000), margin=margin, generator=torch.Generator().manual_seed(3))
    assert t.dtype == torch.int64 and (t >= bound.repeat(2000)).all() and (t < 1000).all()
    # uniform on [t_min, T): the mean of each sample's draws is the interval's midpoint
    means = t.reshape(2000, -1).double().mean(0)
    mid = (bound.double() + 999) / 2
    width = 1000 - bound.double()
    assert ((means - mid).abs() < 5 * width / math.sqrt(12 * 2000)).all()
    # every drawn step gives v > 0 in the operator
    out = rk.risk_noising(torch.zeros(len(t), 2), risk.repeat(2000), t, schedule=schedule)
    assert (out.noise_std > 0).all() and torch.isfinite(out.target).all()


def test_zero_terminal_snr_schedule_accepts_every_finite_risk():
    schedule = rd.NoiseSchedule.linear(zero_terminal_snr=True)
    risk = torch.tensor([1e30, 1e3, 0.0])
    assert rk.timestep_lower_bound(schedule, risk)[0].item() == 999
    t = rk.sample_timesteps(schedule, risk)
    assert t[0].item() == 999 and (t >= rk.timestep_lower_bound(schedule, risk)).all()


def test_cauchy_uses_the_optimal_coefficient():
    D = 12
    c = (D + 2) / (D + 5)
    assert rk.cauchy_variance_factor(D) == c
    schedule = rd.NoiseSchedule.linear()
    risk = torch.full((3, D), 0.7)
    assert torch.equal(rk.timestep_lower_bound(schedule, risk, perturbation="cauchy"),
                       rk.timestep_lower_bound(schedule, risk[:, 0] * math.sqrt(c)))
    assert torch.equal(rk.timestep_lower_bound(schedule, risk[:, 0], perturbation="cauchy", numel_per_sample=D),
                       rk.timestep_lower_bound(schedule, risk, perturbation="cauchy"))
    t = rk.sample_timesteps(schedule, risk, perturbation="cauchy", generator=torch.Generator().manual_seed(4))
    out = rk.risk_noising(torch.randn(3, D), risk, t, schedule=schedule, perturbation="cauchy")
    alpha, sigma = schedule.coefficients(t)
    torch.testing.assert_close(out.noise_std[:, 0] ** 2, sigma ** 2 - alpha ** 2 * c * 0.49)
    assert (out.noise_std > 0).all()


def test_cauchy_variance_factor_values():
    """c_D = (D + 2) / (D + 5), checked as numbers: D = 1 -> 3/6, D = 3 -> 5/8, D = 3072 (3x32x32) -> 3074/3077."""
    assert rk.cauchy_variance_factor(1) == 0.5
    assert rk.cauchy_variance_factor(3) == 0.625
    assert rk.cauchy_variance_factor(12) == pytest.approx(0.8235294117647058, rel=1e-15)
    assert rk.cauchy_variance_factor(3072) == pytest.approx(0.9990250243743907, rel=1e-15)
    # the operator applies it: a [1, 3072] sample with r = 1 has v^2 = sigma^2 - alpha^2 * 3074 / 3077
    alpha, sigma = torch.tensor([0.6]), torch.tensor([0.8])
    _, _, v = OP(torch.zeros(1, 3072), torch.ones(1), torch.zeros(1, 3072), alpha, sigma, "epsilon", "cauchy")
    assert v.item() ** 2 == pytest.approx(0.64 - 0.36 * 0.9990250243743907, rel=1e-5)


def test_too_large_risk_is_reported_not_dropped():
    schedule = rd.NoiseSchedule.linear()
    risk = torch.tensor([0.5, 300.0, 0.0, 1000.0])
    with pytest.raises(ValueError, match=r"risk too large: 2 of 4 samples have no usable timestep.*largest risk 1000"):
        rk.sample_timesteps(schedule, risk)
    assert rk.usable_samples(schedule, risk).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="1 of 1 samples"):
        rk.sample_timesteps(rd.ContinuousVPSchedule(), torch.tensor([1e6]))
    with pytest.raises(ValueError, match="1 of 2 samples"):
        rk.sample_timesteps(rd.EDMSchedule(sigma_max=80.0), torch.tensor([80.0, 1.0]))
    assert torch.isfinite(rk.sample_timesteps(rd.EDMSchedule(), torch.tensor([1e4]))).all()  # unbounded EDM


@pytest.mark.parametrize("function", [rk.timestep_lower_bound, rk.usable_samples, rk.sample_timesteps],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("risk, found", [
    (torch.tensor([0.1, -0.5]), "a minimum of -0.5"),
    (torch.tensor([[0.3, -0.1], [0.0, 0.2]]), "a minimum of -0.1"),  # negative, though not the sample's largest
    (torch.tensor([0.1, float("nan")]), "NaN"),
    (torch.tensor([[0.1, float("nan")], [0.0, 0.0]]), "NaN"),
    (torch.tensor([0.1, float("inf")]), "inf"),
    (torch.tensor([-float("inf"), 0.1]), "a minimum of -inf"),
])
@pytest.mark.parametrize("schedule", [rd.NoiseSchedule.linear(), rd.ContinuousVPSchedule(), rd.EDMSchedule()],
                         ids=["discrete", "vp", "edm"])
def test_bound_functions_refuse_negative_nan_and_infinite_risk(function, risk, found, schedule):
    """The bound squares the risk: a negative one must be refused, not treated as its absolute value."""
    with pytest.raises(ValueError, match=rf"{function.__name__}: risk must be non-negative and finite \(the std of "
                                         rf"each sample's known perturbation\), got {found}"):
        function(schedule, risk)
    function(schedule, risk.abs().nan_to_num(0.0, posinf=0.0))  # the valid version passes


# --------------------------------------------------------------------------- the risk-free loss
def test_variance_weight_is_the_per_element_v_over_sigma_squared():
    schedule = rd.NoiseSchedule.linear()
    x, r, eta, _, _ = make_case((4, 3, 5), seed=10, per_element=True, dtype=torch.float32)
    t = rk.sample_timesteps(schedule, r, generator=torch.Generator().manual_seed(5))
    out = rk.risk_noising(x, r, t, eta, schedule=schedule)
    prediction = torch.randn_like(x)
    gain = out.noise_std / out.clean_std.reshape(4, 1, 1)
    want = (gain ** 2 * (prediction - out.target) ** 2).mean()
    torch.testing.assert_close(rk.risk_free_loss(prediction, out, t, schedule=schedule), want)
    plain = ((prediction - out.target) ** 2).mean()
    torch.testing.assert_close(rk.risk_free_loss(prediction, out, t, schedule=schedule, variance_weight=False), plain)
    # in epsilon space the weighted residual is (v / sigma) eps_hat - eta: bounded however small v is
    torch.testing.assert_close(rk.risk_free_loss(prediction, out, t, schedule=schedule, loss="kl", reduction="none"),
                               ((gain * prediction - eta) ** 2).mean((1, 2)))


@pytest.mark.parametrize("variance_weight", [True, False])
@pytest.mark.parametrize("loss", ["kl", "hellinger"])
def test_risk_free_loss_refuses_samples_outside_their_stability_interval(variance_weight, loss):
    """At t = 10 of the linear schedule r = 1 has v = 0: the sample used to get weight 0 (a silent drop)."""
    schedule = rd.NoiseSchedule.linear()
    x, eta = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.ones(2, 3)
    out = rk.risk_noising(x, torch.tensor([0.0, 1.0]), torch.tensor([10, 10]), eta, schedule=schedule)
    assert out.noise_std[1].item() == 0.0
    message = (r"risk_free_loss: 1 of 2 samples are outside their stability interval \(noise std v = 0 .*"
               r"robust_diffusion\.risk\.sample_timesteps .*robust_diffusion\.risk\.usable_samples")
    for reduction in ("none", "mean"):
        with pytest.raises(ValueError, match=message):
            rk.risk_free_loss(torch.zeros(2, 3), out, torch.tensor([10, 10]), loss=loss, schedule=schedule,
                              variance_weight=variance_weight, reduction=reduction)
    # per-element risk: one risky element outside its interval makes its sample count (2 of 3 here)
    risk = torch.zeros(3, 4)
    risk[0, 1], risk[2, 3], risk[1, 0] = 1.0, 5.0, 0.01
    out = rk.risk_noising(torch.randn(3, 4), risk, torch.tensor([10, 10, 10]), schedule=schedule)
    with pytest.raises(ValueError, match="risk_free_loss: 2 of 3 samples are outside their stability interval"):
        rk.risk_free_loss(torch.zeros(3, 4), out, torch.tensor([10, 10, 10]), schedule=schedule,
                          variance_weight=variance_weight)
    # the same samples at timesteps from their intervals train normally, and the loss keeps every sample
    t = rk.sample_timesteps(schedule, risk, generator=torch.Generator().manual_seed(1))
    out = rk.risk_noising(torch.randn(3, 4), risk, t, schedule=schedule)
    per_sample = rk.risk_free_loss(torch.zeros(3, 4), out, t, schedule=schedule, variance_weight=variance_weight,
                                   reduction="none")
    assert torch.isfinite(per_sample).all() and (per_sample > 0).all()


def test_risk_free_loss_combines_with_divergences_weighting_and_the_module():
    schedule = rd.NoiseSchedule.linear()
    x, r, eta, _, _ = make_case((8, 2, 6), seed=11, per_element=False, dtype=torch.float32)
    t = rk.sample_timesteps(schedule, r, generator=torch.Generator().manual_seed(6))
    out = rk.risk_noising(x, r, t, eta, schedule=schedule)
    prediction = torch.randn_like(x, requires_grad=True)
    gain = (out.noise_std / out.clean_std).reshape(8, 1, 1)
    weight = rd.loss_weights(schedule, t, "min_snr", gamma=5.0)
    got = rk.risk_free_loss(prediction, out, t, loss="hellinger", schedule=schedule, weighting="min_snr",
                            weighting_params={"gamma": 5.0}, reduction="none")
    want = rd.hellinger_loss(gain * prediction, gain * out.target, t, schedule=schedule, weight=weight,
                             reduction="none")
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.isfinite(prediction.grad).all()
    module = rd.RobustDiffusionLoss("ned", schedule)
    value = rk.risk_free_loss(prediction, out, t, loss=module)
    assert value.dim() == 0 and module.last_influence.shape == (8,)
    with pytest.raises(ValueError, match="configure weighting"):
        rk.risk_free_loss(prediction, out, t, loss=module, weighting="min_snr")
    score = rk.risk_noising(x, r, t, eta, schedule=schedule, prediction_type="score")
    with pytest.raises(ValueError, match="predicts 'epsilon' but the targets are 'score'"):
        rk.risk_free_loss(prediction, score, t, loss=module)
    # score-space weighting: epsilon-space weight times sigma^2
    got = rk.risk_free_loss(prediction, score, t, schedule=schedule, weighting="min_snr", reduction="none")
    want = rd.kl_loss(gain * prediction, gain * score.target, weight=weight * score.clean_std ** 2, reduction="none")
    torch.testing.assert_close(got, want)


def test_continuous_process_training_step():
    schedule = rd.ContinuousVPSchedule()
    risk = torch.tensor([0.0, 0.5, 1.0, 2.0])
    t = rk.sample_timesteps(schedule, risk, generator=torch.Generator().manual_seed(7))
    out = rk.risk_noising(torch.randn(4, 3), risk, t, schedule=schedule, prediction_type="v")
    assert out.prediction_type == "v_prediction" and torch.isfinite(out.target).all()
    loss = rk.risk_free_loss(torch.zeros(4, 3, requires_grad=True), out, t, schedule=schedule, loss="ned")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("schedule", [rd.ContinuousVPSchedule(), rd.VESchedule(), rd.EDMSchedule()], ids=repr)
def test_continuous_processes_take_timestep_weights_as_weight(schedule):
    """loss_weights tabulates a discrete schedule: continuous processes get a clear error naming weight=, and
    per-sample weights computed from their log-SNR go through weight=."""
    risk = torch.tensor([0.0, 0.3, 0.6])
    t = rk.sample_timesteps(schedule, risk, generator=torch.Generator().manual_seed(8))
    out = rk.risk_noising(torch.randn(3, 5), risk, t, schedule=schedule)
    prediction = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"risk_free_loss: weighting='min_snr' needs a discrete NoiseSchedule .*"
                                         r"compute per-sample weights \(e\.g\. from schedule\.log_snr\(t\)\) and "
                                         r"pass them as weight="):
        rk.risk_free_loss(prediction, out, t, schedule=schedule, weighting="min_snr")
    min_snr = torch.clamp(torch.exp(schedule.log_snr(t)), max=5.0).float()  # epsilon-space min-SNR-5 / SNR
    weight = min_snr / torch.exp(schedule.log_snr(t)).float()
    gain = (out.noise_std / out.clean_std).reshape(3, 1)
    got = rk.risk_free_loss(prediction, out, t, schedule=schedule, weight=weight, reduction="none")
    torch.testing.assert_close(got, weight * ((gain * prediction - gain * out.target) ** 2).mean(1))


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("vp", [True, False])
def test_opcheck(per_element, vp, device):
    x, r, eta, alpha, sigma = make_case((3, 2, 5), seed=12, per_element=per_element, dtype=torch.float32, vp=vp,
                                        device=device)
    for kind in ("epsilon", "v_prediction"):
        torch.library.opcheck(OP.default, (x, r, eta, alpha, sigma, kind, "cauchy"))


def test_registered_in_a_fragment_of_the_library():
    schema = str(OP.default._schema)
    assert schema == ("robust_diffusion::risk_noising(Tensor sample, Tensor risk, Tensor noise, Tensor? alpha, "
                      "Tensor sigma, str prediction_type, str perturbation) -> (Tensor noisy, Tensor target, "
                      "Tensor noise_std)")


def test_torch_compile_traces_through_the_meta_kernel():
    torch._dynamo.reset()
    schedule = rd.NoiseSchedule.linear()

    def step(x, risk, t, eta):
        out = rk.risk_noising(x * 1.0, risk, t, eta, schedule=schedule)
        return out.noisy + 1.0, out.target

    x, eta = torch.randn(4, 3), torch.randn(4, 3)
    risk, t = torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.tensor([500, 600, 700, 800])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(x, risk, t, eta), step(x, risk, t, eta)):
        assert torch.equal(a, b)


def test_torch_compile_dynamic_shapes():
    """dynamic=True: one graph for every batch size and sample shape, same values as eager."""
    torch._dynamo.reset()
    schedule = rd.NoiseSchedule.linear()

    def step(x, risk, t, eta):
        out = rk.risk_noising(x * 1.0, risk, t, eta, schedule=schedule, prediction_type="sample")
        return out.noisy + 1.0, out.target, out.noise_std

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(15)
    for shape in ((4, 3), (7, 3), (5, 2, 9), (1, 3)):
        x, eta = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        risk = 0.3 * torch.rand(shape, generator=g)
        t = rk.sample_timesteps(schedule, risk, generator=g)
        for a, b in zip(compiled(x, risk, t, eta), step(x, risk, t, eta)):
            assert a.shape == b.shape and torch.equal(a, b)


def test_torch_compile_risk_free_loss_keeps_the_stability_check():
    """Inside a graph the count cannot be read without a host copy: an asynchronous assert refuses instead."""
    torch._dynamo.reset()
    schedule = rd.NoiseSchedule.linear()

    def step(prediction, x, risk, t, eta):
        out = rk.risk_noising(x, risk, t, eta, schedule=schedule)
        return rk.risk_free_loss(prediction, out, t, schedule=schedule, reduction="none")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, eta, prediction = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    risk, t = torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.tensor([500, 600, 700, 800])
    assert torch.equal(compiled(prediction, x, risk, t, eta), step(prediction, x, risk, t, eta))
    with pytest.raises(RuntimeError, match="risk_free_loss: samples outside their stability interval"):
        compiled(prediction, x, torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.full((4,), 10), eta)


def test_torchscript():
    @torch.jit.script
    def noising(x: torch.Tensor, risk: torch.Tensor, eta: torch.Tensor, sigma: torch.Tensor):
        return torch.ops.robust_diffusion.risk_noising(x, risk, eta, None, sigma, "sample", "gaussian")

    x, r, eta, _, sigma = make_case((3, 4), seed=14, per_element=True, vp=False, dtype=torch.float32)
    for a, b in zip(noising(x, r, eta, sigma), OP(x, r, eta, None, sigma, "sample", "gaussian")):
        assert torch.equal(a, b)


def test_empty_batch_sampler():
    assert rk.sample_timesteps(rd.NoiseSchedule.linear(), torch.empty(0, 3)).shape == (0,)
    assert rk.sample_timesteps(rd.VESchedule(), torch.empty(0)).shape == (0,)


def test_not_differentiable_explicitly():
    x, r, eta, alpha, sigma = make_case((2, 3), seed=13, per_element=False, dtype=torch.float32)
    for name, position in (("sample", 0), ("risk", 1), ("noise", 2), ("alpha", 3), ("sigma", 4)):
        args = [x, r, eta, alpha, sigma]
        args[position] = args[position].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name} requires grad, but risk-sensitive noising is data "
                                               f"preparation and has no gradient"):
            OP(*args, "epsilon", "gaussian")
        with torch.no_grad():
            OP(*args, "epsilon", "gaussian")  # allowed: nothing to differentiate


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, error, message", [
    (dict(r=-torch.ones(2)), ValueError, r"risk must be non-negative .* got a minimum of -1"),
    (dict(r=torch.tensor([0.1, float("nan")])), ValueError, r"risk must be non-negative .* got NaN"),
    (dict(r=torch.ones(2, 4)), ValueError, r"risk must have the sample's shape \[2, 3\] .* or one value per sample, "
                                           r"shape \[2\], got shape \[2, 4\]"),
    (dict(r=torch.ones(3)), ValueError, r"risk must have the sample's shape"),
    (dict(r=torch.ones(2, dtype=torch.int64)), TypeError, "risk must be a floating-point tensor"),
    (dict(eta=torch.ones(2, 4)), ValueError, r"noise must have the shape of sample \[2, 3\]"),
    (dict(eta=torch.ones(2, 3, dtype=torch.float64)), TypeError, "noise must have sample's dtype"),
    (dict(alpha=torch.ones(3)), ValueError, r"alpha must have one value per sample, shape \[2\]"),
    (dict(sigma=-torch.ones(2)), ValueError, "sigma must be non-negative"),
    (dict(kind="x0"), ValueError, "prediction_type must be 'epsilon', 'score', 'sample' or 'v_prediction', got 'x0'"),
    (dict(perturbation="laplace"), ValueError, "perturbation must be 'gaussian' or 'cauchy', got 'laplace'"),
])
def test_operator_errors_name_the_argument(change, error, message):
    args = dict(x=torch.ones(2, 3), r=torch.ones(2) * 0.1, eta=torch.ones(2, 3), alpha=torch.ones(2) * 0.5,
                sigma=torch.ones(2) * 0.8, kind="epsilon", perturbation="gaussian")
    args.update(change)
    with pytest.raises(error, match=message):
        OP(*args.values())


def test_python_api_errors():
    schedule = rd.NoiseSchedule.linear()
    with pytest.raises(ValueError, match=r"risk must be non-negative .* got a minimum of -0.5"):
        rk.sample_timesteps(schedule, torch.tensor([0.1, -0.5]))
    with pytest.raises(ValueError, match=r"margin must lie in \[0, 1\)"):
        rk.sample_timesteps(schedule, torch.tensor([0.1]), margin=1.0)
    with pytest.raises(ValueError, match="needs numel_per_sample"):
        rk.sample_timesteps(schedule, torch.tensor([0.1]), perturbation="cauchy")
    with pytest.raises(ValueError, match="perturbation must be one of"):
        rk.timestep_lower_bound(schedule, torch.tensor([0.1]), perturbation="uniform")
    with pytest.raises(ValueError, match="v_prediction' is defined for VP processes"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.ones(2, dtype=torch.float64), schedule=rd.EDMSchedule(),
                        prediction_type="v")
    with pytest.raises(TypeError, match="floating-point times in"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.ones(2, dtype=torch.int64), schedule=rd.VESchedule())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.full((2,), 1.5), schedule=rd.VESchedule())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"^risk_noising: t must lie in \[0, 1000\) \(the step indices of this "
                                         r"NoiseSchedule, T = 1000\), got values in \[0, 1000\]$"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"^NoiseSchedule.coefficients: t must lie in \[0, 7\) .*T = 7\), got values "
                                         r"in \[-1, 2\]$"):
        rd.NoiseSchedule.cosine(7).coefficients(torch.tensor([-1, 2]), caller="NoiseSchedule.coefficients")
    with pytest.raises(ValueError, match=r"^NoiseSchedule\.q_sample: t must lie in \[0, 1000\)"):
        rd.NoiseSchedule.linear().q_sample(torch.ones(1, 2), torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"^risk_noising: t must lie in \[0, 1\] for a continuous schedule"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.full((2,), 1.5), schedule=rd.ContinuousVPSchedule())
    with pytest.raises(TypeError, match=r"^risk_noising: t must hold integer timesteps"):
        rk.risk_noising(torch.ones(2, 3), 0.1, torch.full((2,), 0.5))
    out = rk.risk_noising(torch.ones(2, 3), 0.1, torch.tensor([500, 600]))
    with pytest.raises(ValueError, match=r"input must have the target's shape \(2, 3\)"):
        rk.risk_free_loss(torch.ones(2, 4), out)
    with pytest.raises(ValueError, match="loss must be one of"):
        rk.risk_free_loss(torch.ones(2, 3), out, loss="l1")
