"""docs/DESIGN.md, Divergences through the operators: a sample whose one non-zero residual is sqrt(delta), with target 0,
scale 1 and dim_reduction="sum", has R = delta, so the operators' per-sample loss is phi(delta) and their
influence output w(delta). Checked against DESIGN's printed test vectors, against the float64 references on a log
grid of delta that runs past the end of the NED / JS / Le Cam tables (delta = 144) into their analytic tails, and
at delta = 0 and delta = inf exactly."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch

import robust_diffusion  # noqa: F401  (loads the operators)

from loss_reference import CHI2_MAX_DELTA, LossCase, phi_w

OPS = torch.ops.robust_diffusion

# DESIGN's columns as operator cases; its alpha column is alpha = 1/4 (kappa = 3/16).
CASES = {
    "hellinger": LossCase("hellinger_loss"), "ned": LossCase("ned_loss"), "js": LossCase("js_loss"),
    "tv": LossCase("tv_loss"), "alpha": LossCase("alpha_loss", (0.25,)), "lecam": LossCase("lecam_loss"),
}
# sup phi = phi(inf), correctly rounded (math.expm1(1.0) is one ulp below e - 1, so it comes from Decimal).
SUP = {"hellinger": 4.0, "ned": float(Decimal(1).exp() - 1), "js": float(4 * Decimal(2).ln()), "tv": 1.0,
       "alpha": 1.0 / (0.25 * 0.75), "lecam": 2.0}

# docs/DESIGN.md, Divergences as printed: delta -> {column: (phi, w)}; TV has no printed w (None).
DESIGN_TABLE = {
    0.01: {"hellinger": ("0.00998751", "0.997503"), "ned": ("0.00994985", "0.989957"),
           "js": ("0.00997508", "0.995025"), "tv": ("0.056372", None), "alpha": ("0.00999063", "0.998127")},
    0.1: {"hellinger": ("0.0987604", "0.975310"), "ned": ("0.0949717", "0.900224"),
          "js": ("0.0975786", "0.952315"), "tv": ("0.176937", None), "alpha": ("0.0990683", "0.981425")},
    0.5: {"hellinger": ("0.470012", "0.882497"), "ned": ("0.392925", "0.621273"),
          "js": ("0.445686", "0.795946"), "tv": ("0.382925", None), "alpha": ("0.477278", "0.910510")},
    1: {"hellinger": ("0.884797", "0.778801"), "ned": ("0.654038", "0.441514"),
        "js": ("0.805382", "0.649887"), "tv": ("0.520500", None), "alpha": ("0.911845", "0.829029")},
    2: {"hellinger": ("1.57388", "0.606531"), "ned": ("0.994903", "0.263583"),
        "js": ("1.34732", "0.449600"), "tv": ("0.682689", None), "alpha": ("1.66779", "0.687289")},
    4: {"hellinger": ("2.52848", "0.367879"), "ned": ("1.35239", "0.118464"),
        "js": ("2.00029", "0.231018"), "tv": ("0.842701", None), "alpha": ("2.81405", "0.472367")},
    8: {"hellinger": ("3.45866", "0.135335"), "ned": ("1.61095", "0.0316206"),
        "js": ("2.53088", "0.0685974"), "tv": ("0.954500", None), "alpha": ("4.14331", "0.223130")},
    16: {"hellinger": ("3.92674", "0.0183156"), "ned": ("1.70715", "3.06758e-3"),
         "js": ("2.74614", "7.17626e-3"), "tv": ("0.995322", None), "alpha": ("5.06780", "0.0497871")},
    32: {"hellinger": ("3.99866", "3.35463e-4"), "ned": ("1.71813", "4.00098e-5"),
         "js": ("2.77221", "9.82187e-5"), "tv": ("0.999937", None), "alpha": ("5.32011", "2.47875e-3")},
}
# DESIGN's Le Cam line. Its w at delta = 1 and 8 is printed 0.506056 and 0.0401665, one unit high in the last
# digit: mpmath, scipy quad and the table generator all give 0.50605545200 and 0.040166445187 (as in
# test_divergence_reference.py and tests/cpp/test_divergence_tables.cpp), so those two are the corrected roundings.
for _delta, _values in {0.5: ("0.408109", "0.676392"), 1: ("0.700227", "0.506055"), 2: ("1.100801", "0.316555"),
                        8: ("1.862805", "0.0401664")}.items():
    DESIGN_TABLE[_delta]["lecam"] = _values

DESIGN_ENTRIES = [(column, delta) for delta, row in DESIGN_TABLE.items() for column in row]

# 1e-8 .. 1e4, 8 points a decade; delta > 144 is the tables' analytic tail.
GRID = torch.logspace(-8, 4, 97, dtype=torch.float64)
# w underflows past delta ~ 2800 (exp(-delta / 4) < 2.2e-308): subnormal w has less than double's relative
# precision by construction, so an absolute floor far below any normal double absorbs it and nothing else.
SUBNORMAL = 1e-300


def half_last_digit(printed: str) -> float:
    """Half a unit in the last digit of a decimal as printed ('3.06758e-3' -> 5e-9)."""
    mantissa, _, exponent = printed.lower().partition("e")
    return 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))


def printed_tolerance(printed: str) -> float:
    """Relative 1e-6 or half the last printed digit, whichever is looser."""
    return max(1e-6 * abs(float(printed)), half_last_digit(printed))


def operator_phi_w(case: LossCase, delta: torch.Tensor, dtype=torch.float64):
    """(phi, w, R) from the operator, one sample per delta: x = (sqrt(delta), 0, 0), target 0, scale 1, sum."""
    x = torch.zeros(delta.shape[0], 3, dtype=torch.float64)
    x[:, 0] = delta.sqrt()
    x = x.to(dtype)
    loss, penalty, influence = getattr(OPS, case.op)(x, torch.zeros_like(x), torch.ones(delta.shape[0]), None,
                                                     "sum", "none", *case.params)
    return loss.double(), influence.double(), penalty.double()


def relative_errors(column: str):
    """Largest relative error of phi and w against the float64 reference over GRID (normal w only)."""
    phi, w, _ = operator_phi_w(CASES[column], GRID)
    ref_phi, ref_w = phi_w(CASES[column], GRID)
    normal = ref_w.abs() > SUBNORMAL
    return (((phi - ref_phi).abs() / ref_phi.abs()).max().item(),
            ((w - ref_w).abs()[normal] / ref_w.abs()[normal]).max().item())


@pytest.mark.parametrize("column, delta", DESIGN_ENTRIES, ids=[f"{c}-{d}" for c, d in DESIGN_ENTRIES])
def test_operators_match_design_table(column, delta):
    phi, w, R = operator_phi_w(CASES[column], torch.tensor([float(delta)], dtype=torch.float64))
    assert R.item() == pytest.approx(delta, rel=1e-15)
    phi_printed, w_printed = DESIGN_TABLE[delta][column]
    assert abs(phi.item() - float(phi_printed)) <= printed_tolerance(phi_printed), (phi.item(), phi_printed)
    if w_printed is not None:
        assert abs(w.item() - float(w_printed)) <= printed_tolerance(w_printed), (w.item(), w_printed)


def test_design_table_is_complete():
    """Every printed column: nine deltas for the main table, four for Le Cam."""
    counts = {column: sum(column in row for row in DESIGN_TABLE.values()) for column in CASES}
    assert counts == {"hellinger": 9, "ned": 9, "js": 9, "tv": 9, "alpha": 9, "lecam": 4}


@pytest.mark.parametrize("column", list(CASES))
def test_operators_match_float64_reference_on_a_log_grid(column):
    phi, w, R = operator_phi_w(CASES[column], GRID)
    torch.testing.assert_close(R, GRID, rtol=1e-15, atol=0)
    ref_phi, ref_w = phi_w(CASES[column], GRID)
    assert GRID.max() > 144  # past the last table knot (u = sqrt(delta) = 12)
    torch.testing.assert_close(phi, ref_phi, rtol=1e-6, atol=0)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=SUBNORMAL)


@pytest.mark.parametrize("column", list(CASES))
def test_delta_zero_and_infinity_exactly(column):
    phi, w, _ = operator_phi_w(CASES[column], torch.tensor([0.0, math.inf], dtype=torch.float64))
    assert phi[0].item() == 0.0
    # TV's w is unbounded at 0; the operators define w(0) = 0 there (its minimum-norm subgradient).
    assert w[0].item() == (0.0 if column == "tv" else 1.0)
    assert phi[1].item() == SUP[column]
    assert w[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_chi2_saturates_past_delta_44(dtype):
    """chi^2 / 2 clamps delta at 44 (documented in chi2_loss): finite phi = expm1(88) / 2 and w = exp(88), also in
    float32 (FLT_MAX = 3.4e38 > exp(88) = 1.7e38), for every larger delta including inf; exact below the clamp."""
    case = LossCase("chi2_loss")
    below = torch.tensor([0.0, 1e-6, 1.0, 10.0, 30.0, 43.9], dtype=torch.float64)
    phi, w, _ = operator_phi_w(case, below, dtype)
    ref_phi, ref_w = phi_w(case, below)
    # float32 stores sqrt(delta) rounded (1.2e-7 relative in delta), which exp(2 delta) turns into ~1e-5 at 44.
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(phi, ref_phi, rtol=rtol, atol=0)
    torch.testing.assert_close(w, ref_w, rtol=rtol, atol=0)

    above = torch.tensor([CHI2_MAX_DELTA, 44.5, 50.0, 1e4, 1e30, math.inf], dtype=torch.float64)
    phi, w, _ = operator_phi_w(case, above, dtype)
    saturated_phi, saturated_w = math.expm1(2 * CHI2_MAX_DELTA) / 2, math.exp(2 * CHI2_MAX_DELTA)
    if dtype == torch.float32:
        saturated_phi, saturated_w = (float(torch.tensor(v, dtype=torch.float32)) for v in (saturated_phi, saturated_w))
    assert torch.isfinite(phi).all() and torch.isfinite(w).all()
    assert phi.tolist() == [saturated_phi] * len(above)
    assert w.tolist() == [saturated_w] * len(above)
