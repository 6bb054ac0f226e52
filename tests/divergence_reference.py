"""Float64 references for the f-divergences with no closed form (docs/DESIGN.md, Divergences): NED, Jensen-Shannon x4, Le Cam.

reference_phi_w(name, delta) -> (phi, w), by scipy quadrature, independent of the C++ tables and of their generator
(tools/gen_divergence_tables.py, long double Gauss-Legendre). Relative accuracy about 1e-12 for delta in
[1e-8, 2500] (checked against 13-digit mpmath values in test_divergence_reference.py).

With x = log L ~ N(-delta, 2 delta) the density is exactly pref(delta) exp(-x/2 - x^2/(4 delta)) with
pref = exp(-delta/4) / sqrt(4 pi delta), so E G(L) = pref * integral of G(e^x) exp(-x/2 - x^2/(4 delta)) dx; for the
integrands here that integrand is negligible (below exp(-40) of its peak) outside |x| < min(100, delta + 15 sqrt(delta)).
Plain Gauss-Hermite in Z fails past delta ~ 1 because w's integrand lives in the Gaussian's far tail there.
"""
import math

from scipy.integrate import quad

SUP = {"ned": math.expm1(1.0), "js": 4.0 * math.log(2.0), "lecam": 2.0}


def _f(name, x):
    """f(e^x), without cancellation near x = 0 where f ~ x^2 / 2."""
    if name == "ned":
        v = math.expm1(x)  # u - 1
        return math.expm1(-v) + v
    if name == "js":
        # 2 (u log u - (1 + u) log((1 + u) / 2)) = (1 + u) (q x + log(1 - q^2)) with q = tanh(x/2) and
        # log(1 - q^2) = -2 log cosh(x/2) = -2 log1p(2 sinh(x/4)^2): the two terms differ by a factor ~2.
        return (1.0 + math.exp(x)) * (math.tanh(0.5 * x) * x - 2.0 * math.log1p(2.0 * math.sinh(0.25 * x) ** 2))
    v = math.expm1(x)
    return v * v / (2.0 + v)


def _complement(name, x):
    """F(e^x) = f(0) + u lim f(u)/u - f(u), so that E F(L) = sup - phi (bounded integrand in the tail)."""
    u = math.exp(x)
    if name == "ned":
        return -math.e * math.expm1(-u)
    if name == "js":
        return 2.0 * (math.log1p(u) + u * math.log1p(1.0 / u))
    return 4.0 * u / (1.0 + u)


def _weight(name, x):
    """g(e^x) = u^2 f''(u): w = E g(L)."""
    u = math.exp(x)
    if name == "ned":
        return math.exp(2.0 * x + 1.0 - u)
    if name == "js":
        return 2.0 * u / (1.0 + u)
    return 8.0 * u * u / (1.0 + u) ** 3


def _expect(integrand, name, delta):
    sigma = math.sqrt(2.0 * delta)
    r = min(100.0, delta + 15.0 * math.sqrt(delta))
    cuts = {-delta + sigma * k for k in (-8, -4, -2, -1, 0, 1, 2, 4, 8)} | {0.0}
    cuts |= {s * 2.0 ** j for s in (-1, 1) for j in range(7)}
    cuts = [-r] + sorted(c for c in cuts if -r < c < r) + [r]

    def h(x):
        return integrand(name, x) * math.exp(-0.5 * x - x * x / (4.0 * delta))

    pieces = list(zip(cuts[:-1], cuts[1:]))
    # An absolute tolerance from a rough first pass: pieces far from the mass cannot (and need not) reach a
    # relative one.
    rough = sum(abs(quad(h, a, b, epsrel=1e-6)[0]) for a, b in pieces)
    total = sum(quad(h, a, b, epsabs=1e-15 * rough, epsrel=1e-13, limit=200)[0] for a, b in pieces)
    return math.exp(-0.25 * delta) / math.sqrt(4.0 * math.pi * delta) * total


def reference_phi_w(name, delta):
    """(phi(delta), w(delta)) for name in {"ned", "js", "lecam"} (case-insensitive).

    delta = 0 gives (0, 1), +inf gives (sup, 0); negative or NaN delta gives (nan, nan).
    """
    name = name.lower()
    if name not in SUP:
        raise ValueError(f"unknown divergence {name!r}: expected one of {sorted(SUP)}")
    delta = float(delta)
    if not delta >= 0.0:
        return math.nan, math.nan
    if delta == 0.0:
        return 0.0, 1.0
    if math.isinf(delta):
        return SUP[name], 0.0
    # Direct E f(L) keeps phi's relative accuracy as delta -> 0; past delta = 1 its mass drifts to x ~ +delta
    # (L f(L) weighting) and sup - E F(L) is both easier and exact to rounding.
    if delta <= 1.0:
        phi = _expect(_f, name, delta)
    else:
        phi = SUP[name] - _expect(_complement, name, delta)
    return phi, _expect(_weight, name, delta)
