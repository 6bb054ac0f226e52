// The CPU kernels of the loss operators: one kernel build per instruction set (cpu/isa/*.cpp, all from the
// skeleton in cpu/loss_kernel.h), chosen once at run time the way ATen chooses its own: the best one this CPU
// runs that ATen would also use (so ATEN_CPU_CAPABILITY=default selects the portable build, e.g. in tests, and
// =avx2 the AVX2 build on an AVX-512 CPU). Which build runs, and how work is threaded, the diagnostic operators
// report (diagnostics.h).
#include <ATen/Version.h>
#include <torch/library.h>

#include "../diagnostics.h"
#include "../loss_registration.h"

namespace robust_diffusion {
namespace cpu {

#define RD_DECLARE_CPU_KERNELS(ISA)                                                                          \
  namespace ISA {                                                                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const LossConfig& config, const LossInputs& in); \
  LossOutputsWithGrad loss_forward_with_grad(const LossConfig& config, const LossInputs& in);                \
  at::Tensor loss_backward(const LossConfig& config, const LossInputs& in, const at::Tensor& grad_per_sample,   \
                           const at::Tensor& influence);                                                   \
  }
RD_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
RD_DECLARE_CPU_KERNELS(AVX2)
RD_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef RD_DECLARE_CPU_KERNELS

namespace {

struct CpuKernels {
  const char* instruction_set;
  ForwardKernel forward;
  WithGradKernel with_grad;
  BackwardKernel backward;
};

CpuKernels select_kernels() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", honours ATEN_CPU_CAPABILITY
  if (aten == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return {"avx512", &AVX512::loss_forward, &AVX512::loss_forward_with_grad, &AVX512::loss_backward};
  }
  if ((aten == "AVX2" || aten == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return {"avx2", &AVX2::loss_forward, &AVX2::loss_forward_with_grad, &AVX2::loss_backward};
  }
#endif
  return {"default", &DEFAULT::loss_forward, &DEFAULT::loss_forward_with_grad, &DEFAULT::loss_backward};
}

const CpuKernels& kernels() {
  static const CpuKernels selected = select_kernels();
  return selected;
}

}  // namespace

std::string instruction_set() { return kernels().instruction_set; }

// at::parallel_for is inline, so only a build with OpenMP splits work across torch.get_num_threads() threads (the
// setup.py / CMakeLists.txt flag; a test checks it).
std::string parallel_backend() {
#ifdef _OPENMP
  return "openmp";
#else
  return "serial";
#endif
}

}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_cpu(const LossConfig& config, const LossInputs& in) {
  return cpu::kernels().forward(config, in);
}

LossOutputsWithGrad loss_forward_with_grad_cpu(const LossConfig& config, const LossInputs& in) {
  return cpu::kernels().with_grad(config, in);
}

at::Tensor loss_backward_cpu(const LossConfig& config, const LossInputs& in, const at::Tensor& grad_per_sample,
                             const at::Tensor& influence) {
  return cpu::kernels().backward(config, in, grad_per_sample, influence);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, CPU, m) {
  register_loss_kernels<&loss_forward_cpu, &loss_backward_cpu, &loss_forward_with_grad_cpu>(m);
}

}  // namespace robust_diffusion
