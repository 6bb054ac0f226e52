// Argument validation and dtype harmonisation shared by every loss operator and backend.
#include "loss_spec.h"

#include <c10/util/irange.h>

namespace robust_diffusion {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A per-sample tensor (scale, weight, c): shape [B], floating, on input's device.
at::Tensor per_sample(const LossSpec& spec, const char* argument, const at::Tensor& value,
                      const LossInputs& in, const at::Tensor& input) {
  TORCH_CHECK_VALUE(value.dim() == 1 && value.size(0) == in.batch, spec.name, ": ", argument,
                    " must have one value per sample, shape [", in.batch, "], got shape ", value.sizes());
  TORCH_CHECK_TYPE(is_supported_float(value.scalar_type()), spec.name, ": ", argument,
                   " must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK_VALUE(value.device() == input.device(), spec.name, ": ", argument, " must be on input's device (",
                    input.device(), "), got ", value.device());
  return value.to(in.compute_dtype).contiguous();
}

}  // namespace

void set_reductions(LossSpec& spec, c10::string_view dim_reduction, c10::string_view reduction) {
  TORCH_CHECK_VALUE(dim_reduction == "sum" || dim_reduction == "mean", spec.name,
                    ": dim_reduction must be 'sum' or 'mean', got '", std::string(dim_reduction), "'");
  spec.mean_over_elements = dim_reduction == "mean";
  if (reduction == "mean") {
    spec.reduction = Reduction::Mean;
  } else if (reduction == "sum") {
    spec.reduction = Reduction::Sum;
  } else if (reduction == "none") {
    spec.reduction = Reduction::None;
  } else {
    TORCH_CHECK_VALUE(false, spec.name, ": reduction must be 'mean', 'sum' or 'none', got '", std::string(reduction),
                      "'");
  }
}

LossInputs prepare_inputs(const LossSpec& spec, const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& scale, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(input.dim() >= 1, spec.name, ": input must have a leading batch dimension, got a 0-dim tensor");
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), spec.name, ": target must have the shape of input ",
                    input.sizes(), ", got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(), spec.name, ": target must be on input's device (",
                    input.device(), "), got ", target.device());
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), spec.name,
                   ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(target.scalar_type()), spec.name,
                   ": target must be float32, float64, float16 or bfloat16, got ", target.scalar_type());
  TORCH_CHECK_VALUE(input.size(0) > 0, spec.name, ": input has an empty batch (size(0) == 0)");
  TORCH_CHECK_VALUE(input.numel() > 0, spec.name, ": input has samples with no elements, shape ", input.sizes());

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
  in.compute_dtype = common == at::kDouble ? at::kDouble : at::kFloat;

  in.scale = per_sample(spec, "scale", scale, in, input);
  if (weight.has_value() && weight->defined()) in.weight = per_sample(spec, "weight", *weight, in, input);
  if (spec.penalty == math::PenaltyKind::PseudoHuber) {
    TORCH_CHECK_VALUE(spec.c.defined(), spec.name, ": c is required");
    in.c = per_sample(spec, "c", spec.c, in, input);
    if (in.c.device().is_cpu()) {
      TORCH_CHECK_VALUE(at::all(in.c > 0).item<bool>(), spec.name, ": c must be positive");
    }
  }
  if (in.scale.device().is_cpu()) {  // on an accelerator a negative scale gives NaN instead (no sync)
    TORCH_CHECK_VALUE(at::all(in.scale >= 0).item<bool>(), spec.name, ": scale must be non-negative");
  }
  return in;
}

at::Tensor per_sample_grad(const LossSpec& spec, const at::Tensor& grad_loss, const LossInputs& in) {
  TORCH_CHECK_VALUE(grad_loss.device() == in.input.device(), spec.name, ": grad_loss must be on input's device");
  at::Tensor g = grad_loss.to(in.compute_dtype);
  if (spec.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == in.batch, spec.name,
                      ": grad_loss must have shape [", in.batch, "] for reduction='none', got ", g.sizes());
    return g.contiguous();
  }
  TORCH_CHECK_VALUE(g.numel() == 1, spec.name, ": grad_loss must be a scalar, got shape ", g.sizes());
  if (spec.reduction == Reduction::Mean) g = g / static_cast<double>(in.batch);
  return g.reshape({1}).expand({in.batch}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const LossSpec& spec, const LossInputs& in) {
  const auto options = in.input.options().dtype(in.compute_dtype);
  at::Tensor loss = spec.reduction == Reduction::None ? at::empty({in.batch}, options) : at::empty({}, options);
  return {loss, at::empty({in.batch}, options), at::empty({in.batch}, options)};
}

}  // namespace robust_diffusion
