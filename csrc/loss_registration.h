// Turns one loss entry (losses.h) plus one backend's kernels into the functions registered for its
// forward and backward operators. Every loss takes the same leading arguments; its own parameters
// (Params...) are deduced from Loss::config.
#pragma once

#include <c10/util/Metaprogramming.h>
#include <torch/library.h>

#include <string>

#include "losses.h"

namespace robust_diffusion {

using ForwardKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const LossConfig&, const LossInputs&);
using BackwardKernel = at::Tensor (*)(const LossConfig&, const LossInputs&, const at::Tensor&, const at::Tensor&);

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

// Registers one backend's kernels for every loss operator and its backward (TORCH_LIBRARY_IMPL body).
template <ForwardKernel forward_kernel, BackwardKernel backward_kernel>
void register_loss_kernels(torch::Library& m) {
  losses::for_each_loss([&](auto loss) {
    using Loss = decltype(loss);
    m.impl(Loss::name, &LossOps<Loss>::template forward<forward_kernel>);
    m.impl((std::string(Loss::name) + "_backward").c_str(), &LossOps<Loss>::template backward<backward_kernel>);
  });
}

}  // namespace robust_diffusion
