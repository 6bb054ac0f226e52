// Argument validation of risk_noising, shared by the CPU and CUDA backends.
#include "risk_spec.h"

#include <cmath>
#include <string>

namespace robust_diffusion {
namespace {

constexpr const char* kName = "risk_noising";

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// alpha / sigma: one non-negative value per sample on sample's device.
at::Tensor per_sample_coefficient(const char* argument, const at::Tensor& value, const RiskInputs& in,
                                  const at::Tensor& sample) {
  TORCH_CHECK_VALUE(value.dim() == 1 && value.size(0) == in.batch, kName, ": ", argument,
                    " must have one value per sample, shape [", in.batch, "], got shape ", value.sizes());
  TORCH_CHECK_TYPE(is_supported_float(value.scalar_type()), kName, ": ", argument,
                   " must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK_VALUE(value.device() == sample.device(), kName, ": ", argument, " must be on sample's device (",
                    sample.device(), "), got ", value.device());
  at::Tensor out = value.to(in.compute_dtype).contiguous();
  if (out.device().is_cpu() && out.numel() > 0) {  // on an accelerator a negative value gives NaN (no sync)
    TORCH_CHECK_VALUE(at::all(out >= 0).item<bool>(), kName, ": ", argument,
                      " must be non-negative, got a minimum of ", at::min(out).item<double>());
  }
  return out;
}

math::RiskTarget parse_prediction_type(c10::string_view prediction_type) {
  const bool known = prediction_type == "epsilon" || prediction_type == "score" || prediction_type == "sample" ||
                     prediction_type == "v_prediction";
  TORCH_CHECK_VALUE(known, kName, ": prediction_type must be 'epsilon', 'score', 'sample' or 'v_prediction', got '",
                    std::string(prediction_type), "'");
  if (prediction_type == "epsilon") return math::RiskTarget::Epsilon;
  if (prediction_type == "score") return math::RiskTarget::Score;
  return prediction_type == "sample" ? math::RiskTarget::Sample : math::RiskTarget::Velocity;
}

}  // namespace

RiskInputs prepare_risk_inputs(const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise,
                               const std::optional<at::Tensor>& alpha, const at::Tensor& sigma,
                               c10::string_view prediction_type, c10::string_view perturbation) {
  TORCH_CHECK_VALUE(sample.dim() >= 1, kName, ": sample must have a leading batch dimension, got a 0-dim tensor");
  TORCH_CHECK_TYPE(is_supported_float(sample.scalar_type()), kName,
                   ": sample must be float32, float64, float16 or bfloat16, got ", sample.scalar_type());
  TORCH_CHECK_VALUE(noise.sizes() == sample.sizes(), kName, ": noise must have the shape of sample ", sample.sizes(),
                    ", got ", noise.sizes());
  TORCH_CHECK_TYPE(noise.scalar_type() == sample.scalar_type(), kName, ": noise must have sample's dtype (",
                   sample.scalar_type(), "), got ", noise.scalar_type());
  TORCH_CHECK_VALUE(noise.device() == sample.device(), kName, ": noise must be on sample's device (",
                    sample.device(), "), got ", noise.device());

  RiskInputs in;
  in.batch = sample.size(0);
  in.numel_per_sample = 1;
  for (int64_t d = 1; d < sample.dim(); ++d) in.numel_per_sample *= sample.size(d);
  in.compute_dtype = sample.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.target = parse_prediction_type(prediction_type);
  if (perturbation == "gaussian") {
    in.sqrt_c = 1.0;
  } else if (perturbation == "cauchy") {
    in.sqrt_c = std::sqrt(math::cauchy_variance_factor(in.numel_per_sample));
  } else {
    TORCH_CHECK_VALUE(false, kName, ": perturbation must be 'gaussian' or 'cauchy', got '", std::string(perturbation),
                      "'");
  }

  const bool per_sample_risk = risk.dim() == 1 && risk.size(0) == in.batch;
  in.per_element_risk = !per_sample_risk;  // a 1-D sample ([B]) has one element per sample: either reading agrees
  TORCH_CHECK_VALUE(per_sample_risk || risk.sizes() == sample.sizes(), kName,
                    ": risk must have the sample's shape ", sample.sizes(), " (one std per element) or one value "
                    "per sample, shape [", in.batch, "], got shape ", risk.sizes());
  TORCH_CHECK_TYPE(is_supported_float(risk.scalar_type()), kName, ": risk must be a floating-point tensor, got ",
                   risk.scalar_type());
  TORCH_CHECK_VALUE(risk.device() == sample.device(), kName, ": risk must be on sample's device (", sample.device(),
                    "), got ", risk.device());

  in.sample = sample.contiguous();
  in.noise = noise.contiguous();
  in.risk = risk.to(in.compute_dtype).contiguous();
  if (in.risk.device().is_cpu() && in.risk.numel() > 0) {  // on an accelerator the outputs are NaN instead (no sync)
    TORCH_CHECK_VALUE(at::all(in.risk >= 0).item<bool>(), kName,
                      ": risk must be non-negative (the std of each sample's known perturbation) and not NaN, got ",
                      at::isnan(in.risk).any().item<bool>() ? std::string("NaN")
                                                            : "a minimum of " + std::to_string(at::min(in.risk).item<double>()));
  }
  if (alpha.has_value() && alpha->defined()) in.alpha = per_sample_coefficient("alpha", *alpha, in, sample);
  in.sigma = per_sample_coefficient("sigma", sigma, in, sample);
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_risk_outputs(const RiskInputs& in) {
  return {at::empty(in.sample.sizes(), in.sample.options()), at::empty(in.sample.sizes(), in.sample.options()),
          at::empty(in.risk.sizes(), in.risk.options())};
}

}  // namespace robust_diffusion
