// What a loss operator computes (docs/DESIGN.md, Losses), independent of the backend:
//
//   R_b = sum_i e(r_bi; c_b)   (or the mean over i)     r = input - target
//   loss_b = weight_b * phi(scale_b * R_b)
//   out = mean_b / sum_b / none of loss_b
//
// Each registered operator (hellinger_loss, huber_loss, ...) turns its own arguments into a LossConfig;
// the CPU and CUDA backends run the same two kernels (a fused per-sample reduction and an elementwise
// backward) for every config.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "math/penalties.h"
#include "math/transforms.h"

namespace robust_diffusion {

enum class Reduction { Mean, Sum, None };

struct LossConfig {
  math::PenaltyKind penalty = math::PenaltyKind::Square;
  double penalty_param = 0.0;  // Huber delta, clamp tau, pseudo-Huber form flag
  math::TransformKind transform = math::TransformKind::Identity;
  double transform_param = 0.0;  // alpha kappa, clip tau
  bool mean_over_elements = false;  // dim_reduction = "mean"
  Reduction reduction = Reduction::Mean;
  const char* name = "";  // the operator's name, for error messages
  at::Tensor c;           // pseudo-Huber's per-sample c (undefined for every other loss)
};

// Inputs of one call after validation and dtype harmonisation: input and target either share a dtype,
// or target is float32 and input is float16/bfloat16 (read as is); per-sample tensors are contiguous
// [B] in the compute dtype (float32, or float64 for float64 inputs).
struct LossInputs {
  at::Tensor input, target, scale, weight, c;  // weight / c undefined when absent
  at::ScalarType input_dtype = at::kFloat, target_dtype = at::kFloat;  // as the caller gave them
  int64_t batch = 0, numel_per_sample = 0;
  at::ScalarType compute_dtype = at::kFloat;
};

// Parses the two reduction arguments every operator takes.
void set_reductions(LossConfig& config, c10::string_view dim_reduction, c10::string_view reduction);

// The dtype of the per-sample outputs: float64 if either side is float64, else float32.
at::ScalarType compute_dtype_of(at::ScalarType input, at::ScalarType target);

// Checks what can be checked without reading data (shapes, dtypes, devices), with messages that name the
// argument. The one validation of every path: the real kernels call it through prepare_inputs, the Meta
// kernels (meta_kernels.cpp) that meta tensors, FakeTensorMode, torch.compile and torch.export run call it
// directly, so every path rejects the same calls with the same message. Symbolic shapes are fine.
void check_arguments(const LossConfig& config, const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                     const std::optional<at::Tensor>& weight);
// The backward's own arguments: grad_loss (a scalar, or [B] for reduction='none') and influence [B].
void check_backward_arguments(const LossConfig& config, const at::Tensor& grad_loss, const at::Tensor& input,
                              const at::Tensor& influence);

// check_arguments, then the value checks that need data (on the CPU only: elsewhere they would cost a host
// sync) and the dtype and layout harmonisation of the kernels.
LossInputs prepare_inputs(const LossConfig& config, const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& scale, const std::optional<at::Tensor>& weight);

// The per-sample gradient scale of the backward: grad_loss as a contiguous [B] tensor in the compute
// dtype (the upstream gradient of each sample's loss: g / B for "mean", g for "sum", g_b for "none").
at::Tensor per_sample_grad(const LossConfig& config, const at::Tensor& grad_loss, const LossInputs& in);

// Allocates the forward outputs: loss ([] or [B]), penalty [B], influence [B], all in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const LossConfig& config, const LossInputs& in);

// (loss, penalty, influence, grad_input): the forward's outputs and d loss / d input for an upstream gradient of 1
// (ones for reduction "none"), computed in one pass (docs/DESIGN.md, Kernels).
using LossOutputsWithGrad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace robust_diffusion
