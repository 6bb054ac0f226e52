// The schema of the risk operator, risk_noising (risk_config.h). Argument checks in risk_config.cpp; kernels in
// cpu/risk_kernel.cpp and cuda/risk_kernel.cu; autograd/risk_autograd.cpp makes it explicitly non-differentiable;
// its Meta kernel is in meta_kernels.cpp.
#include <torch/library.h>

namespace robust_diffusion {

TORCH_LIBRARY_FRAGMENT(robust_diffusion, m) {
  m.def(
      "risk_noising(Tensor sample, Tensor risk, Tensor noise, Tensor? alpha, Tensor sigma, str prediction_type, "
      "str perturbation) -> (Tensor noisy, Tensor target, Tensor noise_std)");
}

}  // namespace robust_diffusion
