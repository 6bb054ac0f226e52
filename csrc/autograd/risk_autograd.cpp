// risk_noising is data preparation: it has no gradient. Rather than return outputs that silently carry
// none, its autograd kernel refuses inputs that require grad (while grad mode is on) with an error that
// says what to do; otherwise it runs the backend kernel below autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace robust_diffusion {
namespace {

using RiskSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const std::optional<at::Tensor>&,
                                                               const at::Tensor&, c10::string_view, c10::string_view);

void check_no_grad(const char* argument, const at::Tensor& value) {
  TORCH_CHECK(!value.requires_grad(), "robust_diffusion::risk_noising: ", argument,
              " requires grad, but risk-sensitive noising is data preparation and has no gradient (it would be "
              "silently wrong); pass detached tensors (e.g. ", argument, ".detach()) or call it under torch.no_grad()");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising_autograd(
    const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise, const std::optional<at::Tensor>& alpha,
    const at::Tensor& sigma, c10::string_view prediction_type, c10::string_view perturbation) {
  if (at::GradMode::is_enabled()) {
    check_no_grad("sample", sample);
    check_no_grad("risk", risk);
    check_no_grad("noise", noise);
    if (alpha.has_value() && alpha->defined()) check_no_grad("alpha", *alpha);
    check_no_grad("sigma", sigma);
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("robust_diffusion::risk_noising", "")
                             .typed<RiskSig>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(sample, risk, noise, alpha, sigma, prediction_type, perturbation);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, Autograd, m) { m.impl("risk_noising", &risk_noising_autograd); }

}  // namespace robust_diffusion
