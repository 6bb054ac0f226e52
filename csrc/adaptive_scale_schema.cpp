// The schemas of the adaptive scale's operators, bucket_statistic and adaptive_scale_update
// (adaptive_scale_config.h). Argument checks in adaptive_scale_config.cpp; kernels in cpu/adaptive_scale_kernel.cpp
// and cuda/adaptive_scale_kernel.cu; autograd/adaptive_scale_autograd.cpp makes them explicitly non-differentiable;
// their Meta kernels are in meta_kernels.cpp.
#include <torch/library.h>

namespace robust_diffusion {

TORCH_LIBRARY_FRAGMENT(robust_diffusion, m) {
  m.def("bucket_statistic(Tensor penalty, Tensor bucket, int num_buckets, float floor) -> Tensor");
  m.def(
      "adaptive_scale_update(Tensor(a!) bucket_penalty, Tensor(b!) initialized, Tensor(c!) skipped_updates, "
      "Tensor(d!) limited_updates, Tensor statistic, Tensor? ok, float momentum, float max_ratio, float floor) -> ()");
}

}  // namespace robust_diffusion
