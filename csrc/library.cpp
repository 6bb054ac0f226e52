// The operator library torch.ops.robust_diffusion. This file claims the namespace (the one TORCH_LIBRARY); each
// family of operators adds its schemas to it as a fragment, and every family is laid out the same way:
//
//   <family>_schema.cpp             the schemas (TORCH_LIBRARY_FRAGMENT)
//   <family>_config.h, .cpp         the argument checks that the real and Meta kernels share, the dtype rules
//   cpu/<family>_kernel.cpp         the CPU kernels
//   cuda/<family>_kernel.cu         the CUDA kernels
//   autograd/<family>_autograd.cpp  the Autograd kernels
//   meta_kernels.cpp                the Meta kernels of every family
//
// The families: loss (the operators of the list in losses.h; loss_registration.h registers a backend's kernels for
// every entry, loss_kernel_dispatch.h picks a kernel instantiation), risk (risk_noising) and adaptive_scale
// (bucket_statistic, adaptive_scale_update). The diagnostic operators, named with a leading "_", have a file of
// their own: diagnostics.cpp.
#include <torch/library.h>

TORCH_LIBRARY(robust_diffusion, m) {}
