// The typed C++ API of the operator library, for LibTorch programs: every loss of the list in losses.h and
// risk_noising as C++ functions. They call the registered operators through the dispatcher, so autograd, the CPU,
// CUDA and Meta kernels and their argument checks all apply, exactly as from Python.
//
//   #include "robust_diffusion.h"
//   namespace rd = robust_diffusion;
//   auto [loss, penalty, influence] = rd::loss<rd::losses::NED>(eps_hat, eps, scale);
//   auto alpha = rd::loss<rd::losses::Alpha>(eps_hat, eps, scale, std::nullopt, "mean", "none", /*alpha=*/0.25);
//   auto [noisy, target, noise_std] = rd::risk_noising(x, risk, eta, alpha_t, sigma_t, "epsilon", "gaussian");
//
// A loss's own parameters follow the six common arguments, with the types of its Loss::config (losses.h).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "losses.h"

namespace robust_diffusion {

using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (loss, penalty R_b, influence w_b)

// The dispatcher handles of one loss's forward, with-gradient and backward operators, typed from its entry in losses.h.
template <class Loss, class Params = LossParams<Loss>>
struct LossOperator;

template <class Loss, class... P>
struct LossOperator<Loss, c10::guts::typelist::typelist<P...>> {
  using ForwardSignature = LossOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, c10::string_view, c10::string_view, P...);
  using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, const at::Tensor&, c10::string_view,
                                       c10::string_view, P...);

  static const c10::TypedOperatorHandle<ForwardSignature>& forward() {
    static const auto op = find(Loss::name).template typed<ForwardSignature>();
    return op;
  }
  using WithGradSignature = LossOutputsWithGrad(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, c10::string_view, c10::string_view,
                                                 P...);

  static const c10::TypedOperatorHandle<WithGradSignature>& with_grad() {
    static const auto op = find(std::string(Loss::name) + "_with_grad").template typed<WithGradSignature>();
    return op;
  }
  static const c10::TypedOperatorHandle<BackwardSignature>& backward() {
    static const auto op = find(std::string(Loss::name) + "_backward").template typed<BackwardSignature>();
    return op;
  }

 private:
  static c10::OperatorHandle find(const std::string& name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(("robust_diffusion::" + name).c_str(), "");
  }
};

// robust_diffusion::<Loss::name>(input, target, scale, weight, dim_reduction, reduction, params...).
template <class Loss, class... Params>
LossOutputs loss(const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                 const std::optional<at::Tensor>& weight = std::nullopt, c10::string_view dim_reduction = "mean",
                 c10::string_view reduction = "mean", Params&&... params) {
  return LossOperator<Loss>::forward().call(input, target, scale, weight, dim_reduction, reduction,
                                            std::forward<Params>(params)...);
}

// robust_diffusion::risk_noising: (noisy x_t, the risk-free target, noise_std v); docs/DESIGN.md, Risk.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising(
    const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise, const std::optional<at::Tensor>& alpha,
    const at::Tensor& sigma, c10::string_view prediction_type = "epsilon", c10::string_view perturbation = "gaussian") {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      c10::string_view, c10::string_view);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("robust_diffusion::risk_noising", "").typed<Signature>();
  return op.call(sample, risk, noise, alpha, sigma, prediction_type, perturbation);
}

}  // namespace robust_diffusion
