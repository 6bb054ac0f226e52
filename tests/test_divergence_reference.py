"""The float64 reference for NED / JS / Le Cam (tests/divergence_reference.py) against docs/DESIGN.md, Divergences."""
import math
import sys
from pathlib import Path

import pytest

from divergence_reference import SUP, reference_phi_w

# The printed test vectors and their rounding: one definition, in the table generator.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gen_divergence_tables import DESIGN_VECTORS, half_last_digit  # noqa: E402

# 13 digits from mpmath's tanh-sinh quadrature at 30 digits, delta -> {name: (phi, w)}.
MPMATH_VALUES = {
    1e-6: {"ned": (9.999994999998e-7, 0.9999989999995), "js": (9.999997500001e-7, 0.9999995000002),
           "lecam": (9.999995000004e-7, 0.9999990000012)},
    0.3: {"ned": (0.2577399264944, 0.7368931427314), "js": (0.2794219189774, 0.8683532022818),
          "lecam": (0.2632935954365, 0.7761303508666)},
    3: {"ned": (1.20885279913, 0.1728156348966), "js": (1.727634377019, 0.3196731198712),
        "lecam": (1.360653760258, 0.212106587985)},
    50: {"ned": (1.718280453334, 3.564936908866e-7), "js": (2.772585269576, 8.928200428921e-7),
         "lecam": (1.99999821436, 4.627763579934e-7)},
    1000: {"ned": (1.718281828459, 5.734722619915e-111), "js": (2.77258872224, 1.492409890129e-110),
           "lecam": (2.0, 7.476900618385e-111)},
}


@pytest.mark.parametrize("name,delta", [(n, d) for n, vectors in DESIGN_VECTORS.items() for d in vectors])
def test_reference_matches_design_vectors(name, delta):
    # The printed digits hold the value to half a unit in the last place: 1e-6 to 4e-6 relative.
    phi, w = reference_phi_w(name, delta)
    phi_printed, w_printed = DESIGN_VECTORS[name][delta]
    assert abs(phi - float(phi_printed)) <= half_last_digit(phi_printed)
    assert abs(w - float(w_printed)) <= half_last_digit(w_printed)


@pytest.mark.parametrize("delta", list(MPMATH_VALUES))
def test_reference_matches_mpmath(delta):
    for name, (phi_ref, w_ref) in MPMATH_VALUES[delta].items():
        phi, w = reference_phi_w(name, delta)
        assert phi == pytest.approx(phi_ref, rel=1e-11)
        assert w == pytest.approx(w_ref, rel=1e-11)


@pytest.mark.parametrize("name", list(SUP))
def test_reference_limits(name):
    assert reference_phi_w(name, 0.0) == (0.0, 1.0)
    assert reference_phi_w(name, math.inf) == (SUP[name], 0.0)
    assert all(math.isnan(v) for v in reference_phi_w(name, -1.0) + reference_phi_w(name, math.nan))
    # w = dphi/ddelta (central difference; truncation and rounding both ~1e-9 here).
    for delta in (0.05, 0.7, 3.0, 20.0):
        h = 1e-4
        quotient = (reference_phi_w(name, delta + h)[0] - reference_phi_w(name, delta - h)[0]) / (2 * h)
        assert quotient == pytest.approx(reference_phi_w(name, delta)[1], rel=1e-6)
