// Argument validation and dtype rules of the loss operators, shared by the CPU, CUDA and Meta kernels.
#include "loss_config.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <ATen/ops/min.h>
#include <ATen/ops/promote_types.h>
#include <ATen/Dispatch.h>
#include <c10/util/irange.h>

#include <cmath>

#include "dtypes.h"

namespace robust_diffusion {
namespace {

// A per-sample tensor (scale, weight, c): shape [B], floating, on input's device.
void check_per_sample(const LossConfig& config, const char* argument, const at::Tensor& value, const at::Tensor& input) {
  TORCH_CHECK_VALUE(value.dim() == 1 && value.sym_size(0) == input.sym_size(0), config.name, ": ", argument,
                    " must have one value per sample, shape [", input.sym_size(0), "], got shape ",
                    value.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_float(value.scalar_type()), config.name, ": ", argument,
                   " must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK_VALUE(value.device() == input.device(), config.name, ": ", argument, " must be on input's device (",
                    input.device(), "), got ", value.device());
}

// The value check of a per-sample tensor, on the CPU only (on an accelerator it would cost a host sync; there a
// negative or non-finite value gives NaN or inf outputs instead, as documented in functional.py).
// value is contiguous float32/float64 (prepare_inputs converts it first); a plain loop over its B values costs a
// fraction of the five ATen calls it would take otherwise, which small batches would notice.
void check_finite_at_least(const LossConfig& config, const char* argument, const at::Tensor& value, bool positive) {
  if (!value.device().is_cpu()) return;
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "check_finite_at_least", [&] {
    const scalar_t* p = value.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < value.numel(); ++i) {
      ok = ok && std::isfinite(p[i]) && (positive ? p[i] > 0 : p[i] >= 0);
    }
  });
  TORCH_CHECK_VALUE(ok, config.name, ": ", argument, " must be ", positive ? "positive" : "non-negative",
                    " and finite, got values in [", at::min(value).item<double>(), ", ", at::max(value).item<double>(), "]");
}

}  // namespace

void set_reductions(LossConfig& config, c10::string_view dim_reduction, c10::string_view reduction) {
  TORCH_CHECK_VALUE(dim_reduction == "sum" || dim_reduction == "mean", config.name,
                    ": dim_reduction must be 'sum' or 'mean', got '", std::string(dim_reduction), "'");
  config.mean_over_elements = dim_reduction == "mean";
  if (reduction == "mean") {
    config.reduction = Reduction::Mean;
  } else if (reduction == "sum") {
    config.reduction = Reduction::Sum;
  } else if (reduction == "none") {
    config.reduction = Reduction::None;
  } else {
    TORCH_CHECK_VALUE(false, config.name, ": reduction must be 'mean', 'sum' or 'none', got '", std::string(reduction),
                      "'");
  }
}

at::ScalarType compute_dtype_of(at::ScalarType input, at::ScalarType target) {
  return at::promote_types(input, target) == at::kDouble ? at::kDouble : at::kFloat;
}

void check_arguments(const LossConfig& config, const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                     const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(input.dim() >= 1, config.name, ": input must have a leading batch dimension, got a 0-dim tensor");
  TORCH_CHECK_VALUE(target.sym_sizes() == input.sym_sizes(), config.name, ": target must have the shape of input ",
                    input.sym_sizes(), ", got ", target.sym_sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(), config.name, ": target must be on input's device (",
                    input.device(), "), got ", target.device());
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), config.name,
                   ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(target.scalar_type()), config.name,
                   ": target must be float32, float64, float16 or bfloat16, got ", target.scalar_type());
  TORCH_CHECK_VALUE(input.sym_size(0) > 0, config.name, ": input has an empty batch (size(0) == 0)");
  TORCH_CHECK_VALUE(input.sym_numel() > 0, config.name, ": input has samples with no elements, shape ",
                    input.sym_sizes());
  check_per_sample(config, "scale", scale, input);
  if (weight.has_value() && weight->defined()) check_per_sample(config, "weight", *weight, input);
  if (config.penalty == math::PenaltyKind::PseudoHuber) {
    TORCH_CHECK_VALUE(config.c.defined(), config.name, ": c is required");
    check_per_sample(config, "c", config.c, input);
  }
}

void check_backward_arguments(const LossConfig& config, const at::Tensor& grad_loss, const at::Tensor& input,
                              const at::Tensor& influence) {
  TORCH_CHECK_VALUE(grad_loss.device() == input.device(), config.name, ": grad_loss must be on input's device (",
                    input.device(), "), got ", grad_loss.device());
  TORCH_CHECK_VALUE(influence.device() == input.device(), config.name, ": influence must be on input's device (",
                    input.device(), "), got ", influence.device());
  if (config.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.sym_size(0) == input.sym_size(0), config.name,
                      ": grad_loss must have shape [", input.sym_size(0), "] for reduction='none', got ",
                      grad_loss.sym_sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.sym_numel() == 1, config.name, ": grad_loss must be a scalar, got shape ",
                      grad_loss.sym_sizes());
  }
  TORCH_CHECK_VALUE(influence.dim() == 1 && influence.sym_size(0) == input.sym_size(0), config.name,
                    ": influence must have shape [", input.sym_size(0), "], got ", influence.sym_sizes());
}

LossInputs prepare_inputs(const LossConfig& config, const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& scale, const std::optional<at::Tensor>& weight) {
  check_arguments(config, input, target, scale, weight);

  LossInputs in;
  in.batch = input.size(0);
  in.numel_per_sample = input.numel() / in.batch;
  in.input_dtype = input.scalar_type();
  in.target_dtype = target.scalar_type();

  // Same dtype: read both as they are. A float16/bfloat16 input with a float32 target (autocast
  // output against a float32 noise target) is read as is too. Any other mix is promoted once.
  const at::ScalarType common = at::promote_types(input.scalar_type(), target.scalar_type());
  const bool low_with_float_target = target.scalar_type() == at::kFloat &&
                                     (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16);
  at::ScalarType input_read = input.scalar_type(), target_read = target.scalar_type();
  if (input_read != target_read && !low_with_float_target) input_read = target_read = common;
  in.input = input.to(input_read).contiguous();
  in.target = target.to(target_read).contiguous();
  in.compute_dtype = compute_dtype_of(input.scalar_type(), target.scalar_type());

  in.scale = scale.to(in.compute_dtype).contiguous();
  check_finite_at_least(config, "scale", in.scale, /*positive=*/false);
  if (weight.has_value() && weight->defined()) {
    in.weight = weight->to(in.compute_dtype).contiguous();
    check_finite_at_least(config, "weight", in.weight, /*positive=*/false);
  }
  if (config.penalty == math::PenaltyKind::PseudoHuber) {
    in.c = config.c.to(in.compute_dtype).contiguous();
    check_finite_at_least(config, "c", in.c, /*positive=*/true);
  }
  return in;
}

at::Tensor per_sample_grad(const LossConfig& config, const at::Tensor& grad_loss, const LossInputs& in) {
  at::Tensor g = grad_loss.to(in.compute_dtype);  // shape and device: check_backward_arguments
  if (config.reduction == Reduction::None) return g.contiguous();
  if (config.reduction == Reduction::Mean) g = g / static_cast<double>(in.batch);
  return g.reshape({1}).expand({in.batch}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const LossConfig& config, const LossInputs& in) {
  const auto options = in.input.options().dtype(in.compute_dtype);
  at::Tensor loss = config.reduction == Reduction::None ? at::empty({in.batch}, options) : at::empty({}, options);
  return {loss, at::empty({in.batch}, options), at::empty({in.batch}, options)};
}

}  // namespace robust_diffusion
