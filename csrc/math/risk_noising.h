// Risk-sensitive noising (docs/DESIGN.md, Risk), one element at a time; shared by the CPU and CUDA kernels.
//
// A training sample x~ = x0 + r n carries the known per-element std r >= 0 of its perturbation n. With
// the clean forward process x_t = alpha x0 + sigma eta (VP: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t);
// VE: alpha = 1, sigma^2 = sigma_t^2 - sigma_0^2; EDM: alpha = 1, sigma), the risk-sensitive process adds
// only the noise that is still missing:
//
//   x_t = alpha x~ + v eta,     v^2 = max(sigma^2 - alpha^2 c r^2, 0)
//
// so alpha r n + v eta has the clean variance sigma^2 and, for Gaussian n, x_t has the clean marginal.
// c = 1 for Gaussian perturbations; for Cauchy ones c = c_D = (D + 2) / (D + 5), the optimal coefficient.
// The risk-free targets (unbiased for the clean optimum whatever r is; r_c^2 = c r^2):
//
//   epsilon  (sigma / v) eta                  score  -eta / v
//   sample   x~ - alpha r_c^2 eta / v         v_prediction  alpha eps_target - sigma x0_target
//                                                           = alpha sigma (1 + r_c^2) / v eta - sigma x~
//
// They are the clean targets at r = 0, where this code takes the standard formulas literally (no 0/0),
// with products and sums rounded one at a time (no fused multiply-add), so x_t and the targets are
// bit-identical to PyTorch's eager `alpha * x0 + sigma * eta`, `eta`, `x0`, `alpha * eta - sigma * x0`.
// Outside the stability interval (v = 0 with r > 0) the targets are infinite: the timestep samplers
// keep t inside it. Negative or NaN risk gives NaN everywhere.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace robust_diffusion {
namespace math {

// What the model is trained to predict.
enum class RiskTarget : int { Epsilon = 0, Score = 1, Sample = 2, Velocity = 3 };

// The variance factor c of a Cauchy perturbation with D elements per sample: (D + 2) / (D + 5).
RD_HOST_DEVICE inline double cauchy_variance_factor(int64_t numel_per_sample) {
  const double d = static_cast<double>(numel_per_sample);
  return (d + 2.0) / (d + 5.0);
}

// Products, sums and differences rounded one at a time: nvcc would otherwise contract a * x + b * y into
// an FMA, which differs from PyTorch's separate mul and add kernels in the last bit.
template <typename T>
RD_HOST_DEVICE inline T mul_rn(T a, T b) {
#if RD_ON_DEVICE
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename T>
RD_HOST_DEVICE inline T add_rn(T a, T b) {
#if RD_ON_DEVICE
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

template <typename T>
RD_HOST_DEVICE inline T sub_rn(T a, T b) {
#if RD_ON_DEVICE
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fsub_rn(a, b);
  } else {
    return __dsub_rn(a, b);
  }
#else
  return a - b;
#endif
}

// v = sqrt(max(sigma^2 - (alpha r_c)^2, 0)) with r_c = sqrt(c) r, written as a product of a difference and a
// sum (no cancellation of two squares near the stability boundary). Exactly sigma at r = 0; NaN for a
// negative or NaN risk.
template <typename T>
RD_HOST_DEVICE inline T risk_noise_std(T risk, T sqrt_c, T alpha, T sigma) {
  if (!(risk >= T(0))) return risk < T(0) ? T(NAN) : risk;
  if (risk == T(0)) return sigma;
  const T alpha_r = alpha * (sqrt_c * risk);
  const T v2 = (sigma - alpha_r) * (sigma + alpha_r);
  return v2 > T(0) ? std::sqrt(v2) : T(0);
}

template <typename T>
struct RiskNoised {
  T noisy;   // x_t
  T target;  // the risk-free training target
};

// The standard (clean, r = 0) pipeline.
template <typename T>
RD_HOST_DEVICE inline RiskNoised<T> standard_noising(RiskTarget kind, T x, T eta, T alpha, T sigma) {
  const T noisy = add_rn(mul_rn(alpha, x), mul_rn(sigma, eta));
  switch (kind) {
    case RiskTarget::Epsilon:
      return {noisy, eta};
    case RiskTarget::Score:
      return {noisy, -eta / sigma};
    case RiskTarget::Sample:
      return {noisy, x};
    case RiskTarget::Velocity:
      return {noisy, sub_rn(mul_rn(alpha, eta), mul_rn(sigma, x))};
  }
  return {noisy, eta};
}

// One element: x~ = x, its risk r, noise eta, the sample's alpha and sigma; sqrt_c = sqrt(c).
template <typename T>
RD_HOST_DEVICE inline RiskNoised<T> risk_noising(RiskTarget kind, T x, T eta, T risk, T sqrt_c, T alpha, T sigma) {
  if (risk == T(0)) return standard_noising(kind, x, eta, alpha, sigma);
  const T v = risk_noise_std(risk, sqrt_c, alpha, sigma);  // NaN for a negative or NaN risk
  const T risk_c = sqrt_c * risk;
  const T noisy = add_rn(mul_rn(alpha, x), mul_rn(v, eta));
  switch (kind) {
    case RiskTarget::Epsilon:
      return {noisy, (sigma / v) * eta};
    case RiskTarget::Score:
      return {noisy, -eta / v};
    case RiskTarget::Sample:
      return {noisy, x - (alpha * risk_c * risk_c / v) * eta};
    case RiskTarget::Velocity:
      return {noisy, (alpha * sigma * (T(1) + risk_c * risk_c) / v) * eta - sigma * x};
  }
  return {noisy, eta};
}

}  // namespace math
}  // namespace robust_diffusion
