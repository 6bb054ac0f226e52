// Argument validation and dtype rules of the risk operator (risk_noising), shared by the CPU, CUDA and Meta
// kernels.
#include "risk_config.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/min.h>
#include <cmath>
#include <string>

#include "dtypes.h"

namespace robust_diffusion {
namespace {

constexpr const char* kName = "risk_noising";

// alpha / sigma: one value per sample on sample's device.
void check_coefficient(const char* argument, const at::Tensor& value, const at::Tensor& sample) {
  TORCH_CHECK_VALUE(value.dim() == 1 && value.sym_size(0) == sample.sym_size(0), kName, ": ", argument,
                    " must have one value per sample, shape [", sample.sym_size(0), "], got shape ",
                    value.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_float(value.scalar_type()), kName, ": ", argument,
                   " must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK_VALUE(value.device() == sample.device(), kName, ": ", argument, " must be on sample's device (",
                    sample.device(), "), got ", value.device());
}

// Values must be non-negative and finite; checked on the CPU only (on an accelerator the outputs are NaN or
// inf instead: no host sync).
void check_finite_non_negative(const char* argument, const at::Tensor& value, const char* meaning) {
  if (!value.device().is_cpu() || value.numel() == 0) return;
  if (at::all(at::isfinite(value) & (value >= 0)).item<bool>()) return;
  std::string found = "a minimum of " + std::to_string(at::min(value).item<double>());
  if (at::isnan(value).any().item<bool>()) {
    found = "NaN";
  } else if (at::all(value >= 0).item<bool>()) {
    found = "inf";
  }
  TORCH_CHECK_VALUE(false, kName, ": ", argument, " must be non-negative and finite", meaning, ", got ", found);
}

math::RiskTarget parse_prediction_type(c10::string_view prediction_type) {
  if (prediction_type == "epsilon") return math::RiskTarget::Epsilon;
  if (prediction_type == "score") return math::RiskTarget::Score;
  if (prediction_type == "sample") return math::RiskTarget::Sample;
  TORCH_CHECK_VALUE(prediction_type == "v_prediction", kName,
                    ": prediction_type must be 'epsilon', 'score', 'sample' or 'v_prediction', got '",
                    std::string(prediction_type), "'");
  return math::RiskTarget::Velocity;
}

void check_perturbation(c10::string_view perturbation) {
  TORCH_CHECK_VALUE(perturbation == "gaussian" || perturbation == "cauchy", kName,
                    ": perturbation must be 'gaussian' or 'cauchy', got '", std::string(perturbation), "'");
}

}  // namespace

at::ScalarType risk_compute_dtype(at::ScalarType sample) { return sample == at::kDouble ? at::kDouble : at::kFloat; }

void check_risk_arguments(const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise,
                          const std::optional<at::Tensor>& alpha, const at::Tensor& sigma,
                          c10::string_view prediction_type, c10::string_view perturbation) {
  TORCH_CHECK_VALUE(sample.dim() >= 1, kName, ": sample must have a leading batch dimension, got a 0-dim tensor");
  TORCH_CHECK_TYPE(is_supported_float(sample.scalar_type()), kName,
                   ": sample must be float32, float64, float16 or bfloat16, got ", sample.scalar_type());
  TORCH_CHECK_VALUE(noise.sym_sizes() == sample.sym_sizes(), kName, ": noise must have the shape of sample ",
                    sample.sym_sizes(), ", got ", noise.sym_sizes());
  TORCH_CHECK_TYPE(noise.scalar_type() == sample.scalar_type(), kName, ": noise must have sample's dtype (",
                   sample.scalar_type(), "), got ", noise.scalar_type());
  TORCH_CHECK_VALUE(noise.device() == sample.device(), kName, ": noise must be on sample's device (",
                    sample.device(), "), got ", noise.device());
  parse_prediction_type(prediction_type);
  check_perturbation(perturbation);
  const bool per_sample_risk = risk.dim() == 1 && risk.sym_size(0) == sample.sym_size(0);
  TORCH_CHECK_VALUE(per_sample_risk || risk.sym_sizes() == sample.sym_sizes(), kName,
                    ": risk must have the sample's shape ", sample.sym_sizes(), " (one std per element) or one value "
                    "per sample, shape [", sample.sym_size(0), "], got shape ", risk.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_float(risk.scalar_type()), kName, ": risk must be a floating-point tensor, got ",
                   risk.scalar_type());
  TORCH_CHECK_VALUE(risk.device() == sample.device(), kName, ": risk must be on sample's device (", sample.device(),
                    "), got ", risk.device());
  if (alpha.has_value() && alpha->defined()) check_coefficient("alpha", *alpha, sample);
  check_coefficient("sigma", sigma, sample);
}

RiskInputs prepare_risk_inputs(const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise,
                               const std::optional<at::Tensor>& alpha, const at::Tensor& sigma,
                               c10::string_view prediction_type, c10::string_view perturbation) {
  check_risk_arguments(sample, risk, noise, alpha, sigma, prediction_type, perturbation);

  RiskInputs in;
  in.batch = sample.size(0);
  in.numel_per_sample = 1;
  for (int64_t d = 1; d < sample.dim(); ++d) in.numel_per_sample *= sample.size(d);
  in.compute_dtype = risk_compute_dtype(sample.scalar_type());
  in.target = parse_prediction_type(prediction_type);
  in.sqrt_c = perturbation == "cauchy" ? std::sqrt(math::cauchy_variance_factor(in.numel_per_sample)) : 1.0;
  // A 1-D sample ([B]) has one element per sample: either reading of its risk agrees.
  in.per_element_risk = !(risk.dim() == 1 && risk.size(0) == in.batch);

  in.sample = sample.contiguous();
  in.noise = noise.contiguous();
  in.risk = risk.to(in.compute_dtype).contiguous();
  check_finite_non_negative("risk", in.risk, " (the std of each sample's known perturbation)");
  if (alpha.has_value() && alpha->defined()) {
    in.alpha = alpha->to(in.compute_dtype).contiguous();
    check_finite_non_negative("alpha", in.alpha, "");
  }
  in.sigma = sigma.to(in.compute_dtype).contiguous();
  check_finite_non_negative("sigma", in.sigma, "");
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_risk_outputs(const RiskInputs& in) {
  return {at::empty(in.sample.sizes(), in.sample.options()), at::empty(in.sample.sizes(), in.sample.options()),
          at::empty(in.risk.sizes(), in.risk.options())};
}

}  // namespace robust_diffusion
