// Turns one loss entry (losses.h) plus one backend's kernels into the functions registered for its
// forward and backward operators. Every loss takes the same leading arguments; its own parameters
// (Params...) are deduced from Loss::config.
#pragma once

#include <ATen/ops/ones_like.h>
#include <c10/util/Metaprogramming.h>
#include <torch/library.h>

#include <string>

#include "losses.h"

namespace robust_diffusion {

using ForwardKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const LossConfig&, const LossInputs&);
using BackwardKernel = at::Tensor (*)(const LossConfig&, const LossInputs&, const at::Tensor&, const at::Tensor&);
using WithGradKernel = LossOutputsWithGrad (*)(const LossConfig&, const LossInputs&);

// <loss>_with_grad for a backend without a one-pass kernel: the forward, then the backward for an upstream
// gradient of 1 (the CUDA backend; docs/DESIGN.md, Kernels, says why).
template <ForwardKernel forward_kernel, BackwardKernel backward_kernel>
LossOutputsWithGrad two_pass_with_grad(const LossConfig& config, const LossInputs& in) {
  auto [loss, penalty, influence] = forward_kernel(config, in);
  const at::Tensor ones = at::ones_like(loss);
  return {loss, penalty, influence, backward_kernel(config, in, per_sample_grad(config, ones, in), influence)};
}

template <class Loss, class Params = LossParams<Loss>>
struct LossOps;

template <class Loss, class... P>
struct LossOps<Loss, c10::guts::typelist::typelist<P...>> {
  template <ForwardKernel kernel>
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
      const std::optional<at::Tensor>& weight, c10::string_view dim_reduction, c10::string_view reduction,
      P... params) {
    LossConfig config = Loss::config(params...);
    set_reductions(config, dim_reduction, reduction);
    return kernel(config, prepare_inputs(config, input, target, scale, weight));
  }

  template <WithGradKernel kernel>
  static LossOutputsWithGrad with_grad(const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& weight, c10::string_view dim_reduction,
                                       c10::string_view reduction, P... params) {
    LossConfig config = Loss::config(params...);
    set_reductions(config, dim_reduction, reduction);
    const LossInputs in = prepare_inputs(config, input, target, scale, weight);
    auto [loss, penalty, influence, grad] = kernel(config, in);
    return {loss, penalty, influence, grad.to(in.input_dtype)};
  }

  template <BackwardKernel kernel>
  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                             const at::Tensor& influence, c10::string_view dim_reduction,
                             c10::string_view reduction, P... params) {
    LossConfig config = Loss::config(params...);
    set_reductions(config, dim_reduction, reduction);
    const LossInputs in = prepare_inputs(config, input, target, scale, weight);
    check_backward_arguments(config, grad_loss, input, influence);
    const at::Tensor grad = kernel(config, in, per_sample_grad(config, grad_loss, in),
                                   influence.to(in.compute_dtype).contiguous());
    return grad.to(in.input_dtype);
  }
};

// Registers one backend's kernels for every loss operator, its _with_grad and its _backward (TORCH_LIBRARY_IMPL
// body).
template <ForwardKernel forward_kernel, BackwardKernel backward_kernel,
          WithGradKernel with_grad_kernel = &two_pass_with_grad<forward_kernel, backward_kernel>>
void register_loss_kernels(torch::Library& m) {
  losses::for_each_loss([&](auto loss) {
    using Loss = decltype(loss);
    m.impl(Loss::name, &LossOps<Loss>::template forward<forward_kernel>);
    m.impl((std::string(Loss::name) + "_with_grad").c_str(), &LossOps<Loss>::template with_grad<with_grad_kernel>);
    m.impl((std::string(Loss::name) + "_backward").c_str(), &LossOps<Loss>::template backward<backward_kernel>);
  });
}

}  // namespace robust_diffusion
