"""The float64 reference for NED / JS / Le Cam (tests/divergence_reference.py) against docs/DESIGN.md, Divergences."""
import math

import pytest

from divergence_reference import SUP, reference_phi_w

# docs/DESIGN.md, Divergences, delta -> (phi, w) as printed (correctly rounded, 6-7 significant digits), except Le Cam's w at
# delta = 1 and 8: DESIGN prints 0.506056 and 0.0401665, one unit high in the last digit; this reference, mpmath
# and the table generator's quadrature all give 0.50605545200 and 0.040166445187.
DESIGN_VECTORS = {
    "ned": {0.01: ("0.00994985", "0.989957"), 0.1: ("0.0949717", "0.900224"), 0.5: ("0.392925", "0.621273"),
            1: ("0.654038", "0.441514"), 2: ("0.994903", "0.263583"), 4: ("1.35239", "0.118464"),
            8: ("1.61095", "0.0316206"), 16: ("1.70715", "3.06758e-3"), 32: ("1.71813", "4.00098e-5")},
    "js": {0.01: ("0.00997508", "0.995025"), 0.1: ("0.0975786", "0.952315"), 0.5: ("0.445686", "0.795946"),
           1: ("0.805382", "0.649887"), 2: ("1.34732", "0.449600"), 4: ("2.00029", "0.231018"),
           8: ("2.53088", "0.0685974"), 16: ("2.74614", "7.17626e-3"), 32: ("2.77221", "9.82187e-5")},
    "lecam": {0.5: ("0.408109", "0.676392"), 1: ("0.700227", "0.506055"), 2: ("1.100801", "0.316555"),
              8: ("1.862805", "0.0401664")},
}

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


def half_last_digit(printed):
    """Half a unit in the last digit of a decimal as printed ('3.06758e-3' -> 5e-9)."""
    mantissa, _, exponent = printed.lower().partition("e")
    return 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))


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
