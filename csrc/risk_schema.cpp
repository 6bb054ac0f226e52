// The schema of risk_noising (risk_config.h): a fragment of the robust_diffusion library defined in schemas.cpp.
// CPU and CUDA kernels are in cpu/ and cuda/; autograd/risk_autograd.cpp makes it explicitly
// non-differentiable; its Meta kernel is in meta_kernels.cpp.
#include <torch/library.h>

namespace robust_diffusion {

TORCH_LIBRARY_FRAGMENT(robust_diffusion, m) {
  m.def(
      "risk_noising(Tensor sample, Tensor risk, Tensor noise, Tensor? alpha, Tensor sigma, str prediction_type, "
      "str perturbation) -> (Tensor noisy, Tensor target, Tensor noise_std)");
}

}  // namespace robust_diffusion
