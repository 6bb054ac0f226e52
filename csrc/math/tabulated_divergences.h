// phi(delta) and the influence weight w(delta) = phi'(delta) of the f-divergences with no closed form
// (docs/DESIGN.md, Divergences): NED, Jensen-Shannon x4 and Le Cam, for delta in [0, +inf].
//
// Cubic Hermite interpolation in u = sqrt(delta) on [0, 12] of B = -log(1 - phi/sup) / delta and W = log w, then an
// asymptotic series; max relative error below 1e-8 for phi and w everywhere (method, checks and measured errors:
// tools/gen_divergence_tables.py). phi(0) = 0 and w(0) = 1 exactly; phi(+inf) = sup and w(+inf) = 0.
// Negative or NaN delta gives NaN for both.
#pragma once

#include <cmath>

#include "host_device.h"

// The generated header defines each array through this macro, so the numbers have one source but two copies: a
// namespace-scope constexpr array indexed at run time is not usable in device code. The host copy is an inline
// variable (one per program); the device copy is static, since without -rdc every translation unit needs its own.
#define RD_DIVERGENCE_ARRAY(name, ...)                 \
  inline constexpr double name##_host[] = __VA_ARGS__; \
  static RD_DEVICE_ARRAY const double name##_device[] = __VA_ARGS__;

#include "divergence_tables.h"

#undef RD_DIVERGENCE_ARRAY

namespace robust_diffusion {
namespace math {

struct DivergenceTable {
  const double* knots;   // divergence_tables::kKnots rows of (B, h dB/du, W, h dW/du)
  const double* tail_w;  // w = exp(-delta/4) / sqrt(delta) * sum_k tail_w[k] delta^-k
  const double* tail_s;  // sup - phi, likewise
  double sup;            // phi(+inf)
};

// The table of one divergence, from the copy of the side being compiled.
#if RD_ON_DEVICE
#define RD_DIVERGENCE_TABLE(name)                                                    \
  DivergenceTable {                                                                  \
    divergence_tables::name##_knots_device, divergence_tables::name##_tail_w_device, \
        divergence_tables::name##_tail_s_device, divergence_tables::k_##name##_sup   \
  }
#else
#define RD_DIVERGENCE_TABLE(name)                                                \
  DivergenceTable {                                                              \
    divergence_tables::name##_knots_host, divergence_tables::name##_tail_w_host, \
        divergence_tables::name##_tail_s_host, divergence_tables::k_##name##_sup \
  }
#endif

// Cubic Hermite on one interval: values y0, y1 and slopes s0, s1 per interval (derivative times step), t in [0, 1).
// Written around y0 so that t = 0 returns y0 exactly.
RD_HOST_DEVICE inline double cubic_hermite(double y0, double s0, double y1, double s1, double t) {
  const double dy = y1 - y0;
  return y0 + t * (s0 + t * ((3.0 * dy - 2.0 * s0 - s1) + t * (s0 + s1 - 2.0 * dy)));
}

RD_HOST_DEVICE inline void tabulated_phi_w(const DivergenceTable& table, double delta, double* phi, double* w) {
  using divergence_tables::kStepsPerUnit;
  const double u = sqrt(delta);  // NaN for negative or NaN delta: it fails the test and the tail propagates it
  if (u < divergence_tables::kUMax) {
    const double x = u * kStepsPerUnit;  // exact (a power of two), so x < kKnots - 1 and knot i + 1 exists
    const int i = static_cast<int>(x);
    const double t = x - i;
    const double* k = table.knots + 4 * i;  // knot i at k[0..3], knot i + 1 at k[4..7]
    const double b = cubic_hermite(k[0], k[1], k[4], k[5], t);
    *phi = -table.sup * expm1(-delta * b);
    *w = exp(cubic_hermite(k[2], k[3], k[6], k[7], t));
    return;
  }
  // One exp keeps the scale normal as long as the result is; delta = +inf gives scale = 0: phi = sup, w = 0.
  const double scale = exp(-0.25 * delta - 0.5 * log(delta));
  const double inv = 1.0 / delta;
  double sum_w = 0.0;
  double sum_s = 0.0;
  for (int j = divergence_tables::kTailTerms - 1; j >= 0; --j) {
    sum_w = sum_w * inv + table.tail_w[j];
    sum_s = sum_s * inv + table.tail_s[j];
  }
  *phi = table.sup - scale * sum_s;
  *w = scale * sum_w;
}

// Negative exponential disparity, f(u) = exp(1 - u) - 2 + u: phi = e E[exp(-L)] - 1, sup phi = e - 1.
RD_HOST_DEVICE inline void ned_phi_w(double delta, double* phi, double* w) {
  tabulated_phi_w(RD_DIVERGENCE_TABLE(ned), delta, phi, w);
}

// Jensen-Shannon x4, f''(u) = 2 / (u (1 + u)): w = 2 E[L / (1 + L)], sup phi = 4 ln 2.
RD_HOST_DEVICE inline void js_phi_w(double delta, double* phi, double* w) {
  tabulated_phi_w(RD_DIVERGENCE_TABLE(js), delta, phi, w);
}

// Le Cam, f(u) = (u - 1)^2 / (u + 1): w = 8 E[L^2 / (1 + L)^3], sup phi = 2.
RD_HOST_DEVICE inline void lecam_phi_w(double delta, double* phi, double* w) {
  tabulated_phi_w(RD_DIVERGENCE_TABLE(lecam), delta, phi, w);
}

#undef RD_DIVERGENCE_TABLE

}  // namespace math
}  // namespace robust_diffusion
