// The adaptive scale's operators (adaptive_scale_config.h) keep running state: they have no gradient. Their autograd
// kernels refuse inputs that require one (while grad mode is on) rather than return a statistic that silently
// carries none, run the backend kernel below autograd, and bump the version counters of the state that
// adaptive_scale_update changes in place, as PyTorch's own in-place operators do.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>

namespace robust_diffusion {
namespace {

void check_no_grad(const char* op, const char* argument, const at::Tensor& value) {
  TORCH_CHECK(!value.requires_grad(), "robust_diffusion::", op, ": ", argument, " requires grad, but ", op,
              " has no gradient (the adaptive scale is running state); pass ", argument, ".detach()");
}

at::Tensor bucket_statistic_autograd(const at::Tensor& penalty, const at::Tensor& bucket, int64_t num_buckets,
                                     double floor) {
  if (at::GradMode::is_enabled()) check_no_grad("bucket_statistic", "penalty", penalty);
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("robust_diffusion::bucket_statistic", "")
                             .typed<Signature>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(penalty, bucket, num_buckets, floor);
}

void adaptive_scale_update_autograd(const at::Tensor& bucket_penalty, const at::Tensor& initialized,
                                    const at::Tensor& skipped_updates, const at::Tensor& limited_updates,
                                    const at::Tensor& statistic, const std::optional<at::Tensor>& ok, double momentum,
                                    double max_ratio, double floor) {
  if (at::GradMode::is_enabled()) {
    check_no_grad("adaptive_scale_update", "bucket_penalty", bucket_penalty);
    check_no_grad("adaptive_scale_update", "statistic", statistic);
  }
  using Signature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&, double, double, double);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("robust_diffusion::adaptive_scale_update", "")
                             .typed<Signature>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(bucket_penalty, initialized, skipped_updates, limited_updates, statistic, ok, momentum, max_ratio, floor);
  }
  for (const at::Tensor* state : {&bucket_penalty, &initialized, &skipped_updates, &limited_updates}) {
    torch::autograd::impl::bump_version(*state);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, Autograd, m) {
  m.impl("bucket_statistic", &bucket_statistic_autograd);
  m.impl("adaptive_scale_update", &adaptive_scale_update_autograd);
}

}  // namespace robust_diffusion
