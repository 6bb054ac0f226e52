// CUDA kernel of risk_noising: elementwise (math/risk_noising.h, the formulas the CPU kernel uses) on a
// 2-D grid (samples x segments), so small batches of long samples still fill the device. Products and
// sums are rounded one at a time (no FMA), so r = 0 reproduces PyTorch's eager noising bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../risk_config.h"
#include "launch.cuh"

namespace robust_diffusion {
namespace {

using cuda::kThreads;
using cuda::segments_per_sample;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) risk_noising_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ eta, const acc_t* __restrict__ risk,
    bool per_element, const acc_t* __restrict__ alpha, const acc_t* __restrict__ sigma, acc_t sqrt_c,
    math::RiskTarget kind, int64_t D, int64_t segment, scalar_t* __restrict__ noisy, scalar_t* __restrict__ target,
    acc_t* __restrict__ noise_std) {
  const int64_t b = blockIdx.x;
  const acc_t a = alpha != nullptr ? alpha[b] : acc_t(1);
  const acc_t s = sigma[b];
  const int64_t begin = b * D + static_cast<int64_t>(blockIdx.y) * segment;
  const int64_t end = b * D + min(D, (static_cast<int64_t>(blockIdx.y) + 1) * segment);
  if (!per_element && blockIdx.y == 0 && threadIdx.x == 0) noise_std[b] = math::risk_noise_std(risk[b], sqrt_c, a, s);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const acc_t r = per_element ? risk[i] : risk[b];
    const math::RiskNoised<acc_t> e =
        math::risk_noising<acc_t>(kind, static_cast<acc_t>(x[i]), static_cast<acc_t>(eta[i]), r, sqrt_c, a, s);
    noisy[i] = static_cast<scalar_t>(e.noisy);
    target[i] = static_cast<scalar_t>(e.target);
    if (per_element) noise_std[i] = math::risk_noise_std(r, sqrt_c, a, s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising_cuda(const RiskInputs& in) {
  const c10::cuda::CUDAGuard guard(in.sample.device());
  auto [noisy, target, noise_std] = allocate_risk_outputs(in);
  const int64_t B = in.batch, D = in.numel_per_sample;
  if (B == 0) return {noisy, target, noise_std};
  const int64_t segments = segments_per_sample(B, D);
  const int64_t segment = (D + segments - 1) / segments;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.sample.scalar_type(), "risk_noising_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    risk_noising_kernel<scalar_t, acc_t><<<dim3(B, segments), kThreads, 0, stream>>>(
        in.sample.const_data_ptr<scalar_t>(), in.noise.const_data_ptr<scalar_t>(), in.risk.const_data_ptr<acc_t>(),
        in.per_element_risk, in.alpha.defined() ? in.alpha.const_data_ptr<acc_t>() : nullptr,
        in.sigma.const_data_ptr<acc_t>(), static_cast<acc_t>(in.sqrt_c), in.target, D, segment,
        noisy.mutable_data_ptr<scalar_t>(), target.mutable_data_ptr<scalar_t>(), noise_std.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {noisy, target, noise_std};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising_cuda_op(
    const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise, const std::optional<at::Tensor>& alpha,
    const at::Tensor& sigma, c10::string_view prediction_type, c10::string_view perturbation) {
  return risk_noising_cuda(prepare_risk_inputs(sample, risk, noise, alpha, sigma, prediction_type, perturbation));
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, CUDA, m) { m.impl("risk_noising", &risk_noising_cuda_op); }

}  // namespace robust_diffusion
