// Meta kernels: the output shapes and dtypes of every operator without computing anything. Meta tensors,
// FakeTensorMode, torch.compile and torch.export run these. Each one runs the same argument checks as the real
// kernels (check_arguments / check_risk_arguments, and each loss's own Loss::config), so a bad argument fails
// while tracing with the message it gets in eager mode, not only when the compiled graph runs. Sizes are
// symbolic (SymInt) throughout, for dynamic shapes.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "adaptive_scale_config.h"
#include "loss_registration.h"
#include "risk_config.h"

namespace robust_diffusion {
namespace {

template <class Loss, class Params = LossParams<Loss>>
struct LossMeta;

template <class Loss, class... P>
struct LossMeta<Loss, c10::guts::typelist::typelist<P...>> {
  static LossConfig checked_config(const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                               const std::optional<at::Tensor>& weight, c10::string_view dim_reduction,
                               c10::string_view reduction, P... params) {
    LossConfig config = Loss::config(params...);
    set_reductions(config, dim_reduction, reduction);
    check_arguments(config, input, target, scale, weight);
    return config;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
      const std::optional<at::Tensor>& weight, c10::string_view dim_reduction, c10::string_view reduction,
      P... params) {
    const LossConfig config = checked_config(input, target, scale, weight, dim_reduction, reduction, params...);
    const auto options = input.options().dtype(compute_dtype_of(input.scalar_type(), target.scalar_type()));
    const c10::SymInt batch = input.sym_size(0);
    at::Tensor loss = config.reduction == Reduction::None ? at::empty_symint({batch}, options) : at::empty({}, options);
    return {loss, at::empty_symint({batch}, options), at::empty_symint({batch}, options)};
  }

  static LossOutputsWithGrad with_grad(const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& weight, c10::string_view dim_reduction,
                                       c10::string_view reduction, P... params) {
    auto [loss, penalty, influence] = forward(input, target, scale, weight, dim_reduction, reduction, params...);
    return {loss, penalty, influence, at::empty_symint(input.sym_sizes(), input.options())};
  }

  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                             const at::Tensor& influence, c10::string_view dim_reduction, c10::string_view reduction,
                             P... params) {
    const LossConfig config = checked_config(input, target, scale, weight, dim_reduction, reduction, params...);
    check_backward_arguments(config, grad_loss, input, influence);
    return at::empty_symint(input.sym_sizes(), input.options());  // contiguous, input's dtype: as the real kernels
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising_meta(
    const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise, const std::optional<at::Tensor>& alpha,
    const at::Tensor& sigma, c10::string_view prediction_type, c10::string_view perturbation) {
  check_risk_arguments(sample, risk, noise, alpha, sigma, prediction_type, perturbation);
  const auto risk_options = risk.options().dtype(risk_compute_dtype(sample.scalar_type()));
  return {at::empty_symint(sample.sym_sizes(), sample.options()), at::empty_symint(sample.sym_sizes(), sample.options()),
          at::empty_symint(risk.sym_sizes(), risk_options)};
}

at::Tensor bucket_statistic_meta(const at::Tensor& penalty, const at::Tensor& bucket, int64_t num_buckets,
                                 double floor) {
  check_statistic_arguments(penalty, bucket, num_buckets, floor);
  return at::empty({statistic_size(num_buckets)}, penalty.options().dtype(at::kFloat));
}

void adaptive_scale_update_meta(const at::Tensor& bucket_penalty, const at::Tensor& initialized,
                                const at::Tensor& skipped_updates, const at::Tensor& limited_updates,
                                const at::Tensor& statistic, const std::optional<at::Tensor>& ok, double momentum,
                                double max_ratio, double floor) {
  check_update_arguments(bucket_penalty, initialized, skipped_updates, limited_updates, statistic, ok, momentum,
                         max_ratio, floor);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, Meta, m) {
  losses::for_each_loss([&](auto loss) {
    using Loss = decltype(loss);
    m.impl(Loss::name, &LossMeta<Loss>::forward);
    m.impl((std::string(Loss::name) + "_with_grad").c_str(), &LossMeta<Loss>::with_grad);
    m.impl((std::string(Loss::name) + "_backward").c_str(), &LossMeta<Loss>::backward);
  });
  m.impl("risk_noising", &risk_noising_meta);
  m.impl("bucket_statistic", &bucket_statistic_meta);
  m.impl("adaptive_scale_update", &adaptive_scale_update_meta);
}

}  // namespace robust_diffusion
