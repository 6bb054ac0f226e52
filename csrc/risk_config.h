// The risk-sensitive noising operator (docs/DESIGN.md, Risk, math/risk_noising.h), independent of the backend:
//
//   risk_noising(sample, risk, noise, alpha, sigma, prediction_type, perturbation) -> (noisy, target, noise_std)
//
// sample x~ [B, ...], risk r [B, ...] (per element) or [B] (per sample), noise eta like sample, alpha [B]
// (None: 1, the VE and EDM processes) and sigma [B] the clean process x_t = alpha x0 + sigma eta.
// noisy and target have sample's shape and dtype; noise_std (v) has risk's shape, in the compute dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "math/risk_noising.h"

namespace robust_diffusion {

// Inputs of one call after validation: sample and noise contiguous in sample's dtype; risk, alpha, sigma
// contiguous in the compute dtype (float32, or float64 for float64 samples); alpha undefined for 1.
struct RiskInputs {
  at::Tensor sample, noise, risk, alpha, sigma;
  math::RiskTarget target = math::RiskTarget::Epsilon;
  double sqrt_c = 1.0;  // sqrt of the perturbation's variance factor: 1 (Gaussian) or sqrt(c_D) (Cauchy)
  bool per_element_risk = false;
  int64_t batch = 0, numel_per_sample = 0;
  at::ScalarType compute_dtype = at::kFloat;
};

// Checks what can be checked without reading data (shapes, dtypes, devices, the two strings), with messages
// that name the argument: the one validation that the real kernels (through prepare_risk_inputs) and the Meta
// kernel (meta_kernels.cpp) share. Symbolic shapes are fine.
void check_risk_arguments(const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise,
                          const std::optional<at::Tensor>& alpha, const at::Tensor& sigma,
                          c10::string_view prediction_type, c10::string_view perturbation);

// check_risk_arguments, then the value checks (on the CPU only: elsewhere they would cost a host sync) and
// the layouts of the kernels.
RiskInputs prepare_risk_inputs(const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise,
                               const std::optional<at::Tensor>& alpha, const at::Tensor& sigma,
                               c10::string_view prediction_type, c10::string_view perturbation);

// The compute dtype: float64 for float64 samples, else float32.
at::ScalarType risk_compute_dtype(at::ScalarType sample);

// (noisy, target, noise_std), empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_risk_outputs(const RiskInputs& in);

}  // namespace robust_diffusion
