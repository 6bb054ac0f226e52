// Per-sample transforms phi(delta) and influence weights w(delta) = phi'(delta) (docs/DESIGN.md, Losses, Divergences and Baselines),
// and the per-sample arithmetic shared by every backend's forward and backward kernels.
//
// Everything here runs once per sample (B values, not N elements), so it is done in double.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "tabulated_divergences.h"

namespace robust_diffusion {
namespace math {

enum class TransformKind : int {
  Identity = 0,  // KL: the plain (weighted, scaled) penalty; also every M-estimator baseline
  Alpha = 1,     // alpha-divergence, param = kappa = alpha (1 - alpha); Hellinger is kappa = 1/4
  NED = 2,       // negative exponential disparity (tabulated)
  JS = 3,        // Jensen-Shannon x4 (tabulated)
  LeCam = 4,     // Le Cam (tabulated)
  TV = 5,        // total variation
  Chi2 = 6,      // Pearson chi^2 / 2 (anti-robust), saturated at kChi2MaxDelta
  Clip = 7,      // min(delta, tau), param = tau: the per-sample clipped MSE
};

// exp(2 delta) stays below FLT_MAX (3.4e38) up to delta = 44.36: chi^2 saturates there so per-sample
// float32 outputs stay finite. Beyond it phi is constant and w is held at exp(88), so the (anti-robust)
// gradient keeps its direction instead of vanishing.
constexpr double kChi2MaxDelta = 44.0;

struct PhiW {
  double phi;  // the transformed per-sample loss
  double w;    // its derivative: the influence weight of the sample
};

// Negative delta has no meaning (delta = scale * a non-negative penalty): NaN, like NaN inputs, propagates.
RD_HOST_DEVICE inline PhiW transform_phi_w(TransformKind kind, double param, double delta) {
  if (!(delta >= 0.0)) {
    const double nan = delta < 0.0 ? NAN : delta;
    return {nan, nan};
  }
  PhiW out{delta, 1.0};
  switch (kind) {
    case TransformKind::Identity:
      break;
    case TransformKind::Alpha:  // phi = (1 - exp(-kappa delta)) / kappa, w = exp(-kappa delta)
      out.phi = -expm1(-param * delta) / param;
      out.w = exp(-param * delta);
      break;
    case TransformKind::NED:
      ned_phi_w(delta, &out.phi, &out.w);
      break;
    case TransformKind::JS:
      js_phi_w(delta, &out.phi, &out.w);
      break;
    case TransformKind::LeCam:
      lecam_phi_w(delta, &out.phi, &out.w);
      break;
    case TransformKind::TV:
      // phi = erf(sqrt(delta) / 2) behaves like a norm of the residual at 0, where w is unbounded:
      // w(0) is defined as 0, the minimum-norm subgradient (the residual is 0 there, so no gradient
      // flows either way).
      out.phi = erf(0.5 * sqrt(delta));
      out.w = delta > 0.0 ? exp(-0.25 * delta) / (2.0 * sqrt(M_PI * delta)) : 0.0;
      break;
    case TransformKind::Chi2: {
      const double d = delta > kChi2MaxDelta ? kChi2MaxDelta : delta;
      out.phi = 0.5 * expm1(2.0 * d);
      out.w = exp(2.0 * d);
      break;
    }
    case TransformKind::Clip:  // zero gradient once the sample's loss is clipped
      out.phi = delta > param ? param : delta;
      out.w = delta > param ? 0.0 : 1.0;
      break;
  }
  return out;
}

// Per-sample forward: R is the penalty summed over the sample's D elements.
struct SampleForward {
  double penalty;    // R_b, or R_b / D for dim_reduction = "mean"
  double loss;       // weight_b * phi(scale_b * penalty)
  double influence;  // w(scale_b * penalty)
};

RD_HOST_DEVICE inline SampleForward sample_forward(TransformKind kind, double param, double penalty_sum,
                                                   int64_t numel_per_sample, bool mean_over_elements,
                                                   double scale, double weight) {
  const double penalty = mean_over_elements ? penalty_sum / static_cast<double>(numel_per_sample) : penalty_sum;
  const PhiW pw = transform_phi_w(kind, param, scale * penalty);
  return {penalty, weight * pw.phi, pw.w};
}

// d loss / d e(r_bi) for one sample: g_b * weight_b * w_b * scale_b (/ D for "mean"). The backward
// kernels multiply it by e'(r_bi).
RD_HOST_DEVICE inline double sample_grad_coefficient(double grad_loss_b, double weight, double influence,
                                                     double scale, int64_t numel_per_sample,
                                                     bool mean_over_elements) {
  const double coef = grad_loss_b * weight * influence * scale;
  return mean_over_elements ? coef / static_cast<double>(numel_per_sample) : coef;
}

}  // namespace math
}  // namespace robust_diffusion
