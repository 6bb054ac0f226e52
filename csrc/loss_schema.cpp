// The schemas of the loss operators, for every loss in losses.h: <loss>, <loss>_with_grad (the forward and the
// input's gradient in one pass, which autograd uses on the CPU) and <loss>_backward. Argument checks in
// loss_config.cpp; kernels in cpu/loss_kernel.cpp and cuda/loss_kernel.cu, registered for every loss by
// loss_registration.h; autograd in autograd/loss_autograd.cpp; Meta kernels in meta_kernels.cpp.
#include <torch/library.h>

#include <string>

#include "losses.h"

namespace robust_diffusion {
namespace {

constexpr const char* kForwardArgs =
    "(Tensor input, Tensor target, Tensor scale, Tensor? weight, str dim_reduction, str reduction";
constexpr const char* kForwardReturns = ") -> (Tensor loss, Tensor penalty, Tensor influence)";
constexpr const char* kWithGradReturns =
    ") -> (Tensor loss, Tensor penalty, Tensor influence, Tensor grad_input)";
constexpr const char* kBackwardArgs =
    "_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor scale, Tensor? weight, Tensor influence, "
    "str dim_reduction, str reduction";

}  // namespace

TORCH_LIBRARY_FRAGMENT(robust_diffusion, m) {
  losses::for_each_loss([&](auto loss) {
    using Loss = decltype(loss);
    m.def((std::string(Loss::name) + kForwardArgs + Loss::params + kForwardReturns).c_str());
    m.def((std::string(Loss::name) + "_with_grad" + kForwardArgs + Loss::params + kWithGradReturns).c_str());
    m.def((std::string(Loss::name) + kBackwardArgs + Loss::params + ") -> Tensor").c_str());
  });
}

}  // namespace robust_diffusion
