// CUDA kernels for every loss, on the same skeleton and math headers as the CPU ones:
//
//   1. penalty_partial_sums: a 2-D grid (samples x segments). Each block sums e(r) over one segment of
//      one sample with 16-byte vector loads, and writes one partial sum. Small batches of very long
//      samples still fill the GPU because a sample is cut into as many segments as needed.
//   2. finalize: one block. Each thread adds a sample's partial sums in order (double), applies the
//      per-sample transform (math/transforms.h) and the batch reduction is a fixed tree.
//   3. grad_input: the same 2-D grid, elementwise: coefficient_b * e'(r_bi).
//
// No float atomics anywhere: results are bitwise reproducible for a given device and shape.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../loss_kernel_dispatch.h"
#include "../loss_registration.h"
#include "launch.cuh"

namespace robust_diffusion {
namespace {

using cuda::kThreads;
using cuda::segments_per_sample;

// VEC consecutive elements loaded or stored as one (16 bytes for the input's type).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Splits [begin, end) of one sample into a scalar head, a vector body starting at an address where
// every pointer is aligned for a Pack, and a scalar tail. Samples start anywhere (D may be odd).
template <int VEC, typename in_t, typename tgt_t>
struct Segment {
  int64_t begin, body_begin, body_end, end;
  __device__ Segment(const in_t* x, const tgt_t* y, const in_t* out, int64_t begin_, int64_t end_)
      : begin(begin_), end(end_) {
    constexpr size_t kBytes = sizeof(Pack<in_t, VEC>);
    const int64_t misaligned = (reinterpret_cast<uintptr_t>(x + begin) % kBytes) / sizeof(in_t);
    body_begin = misaligned == 0 ? begin : min64(end, begin + VEC - misaligned);
    const bool vector_ok = is_aligned(y + body_begin, sizeof(Pack<tgt_t, VEC>)) &&
                           (out == nullptr || is_aligned(out + body_begin, kBytes));
    body_end = vector_ok ? body_begin + (end - body_begin) / VEC * VEC : body_begin;
  }
};

// Applies f(i, r_i) to every element of the block's segment: scalar head and tail, vector body.
template <int VEC, typename acc_t, typename in_t, typename tgt_t, typename ScalarF, typename VectorF>
__device__ __forceinline__ void for_each_residual(const Segment<VEC, in_t, tgt_t>& s, const in_t* x, const tgt_t* y,
                                                  ScalarF scalar_f, VectorF vector_f) {
  for (int64_t i = s.begin + threadIdx.x; i < s.body_begin; i += kThreads) {
    scalar_f(i, static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]));
  }
  for (int64_t i = s.body_begin + threadIdx.x * VEC; i < s.body_end; i += kThreads * VEC) {
    const Pack<in_t, VEC> xv = *reinterpret_cast<const Pack<in_t, VEC>*>(x + i);
    const Pack<tgt_t, VEC> yv = *reinterpret_cast<const Pack<tgt_t, VEC>*>(y + i);
    acc_t r[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = static_cast<acc_t>(xv.v[k]) - static_cast<acc_t>(yv.v[k]);
    vector_f(i, r);
  }
  for (int64_t i = s.body_end + threadIdx.x; i < s.end; i += kThreads) {
    scalar_f(i, static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]));
  }
}

template <typename in_t>
constexpr int vector_width() {
  return 16 / sizeof(in_t) < 2 ? 2 : 16 / sizeof(in_t);
}

template <typename Penalty, typename acc_t, typename in_t, typename tgt_t>
__global__ void __launch_bounds__(kThreads) penalty_partial_sums_kernel(
    const in_t* __restrict__ input, const tgt_t* __restrict__ target, const acc_t* __restrict__ c,
    double penalty_param, int64_t D, int64_t segment, acc_t* __restrict__ partial) {
  constexpr int VEC = vector_width<in_t>();
  const int64_t b = blockIdx.x;
  const Penalty e = Penalty::make(penalty_param, c != nullptr ? static_cast<double>(c[b]) : 0.0);
  const in_t* x = input + b * D;
  const tgt_t* y = target + b * D;
  const int64_t begin = blockIdx.y * segment;
  const Segment<VEC, in_t, tgt_t> s(x, y, nullptr, min64(begin, D), min64(begin + segment, D));

  acc_t acc = acc_t(0);
  for_each_residual<VEC, acc_t>(
      s, x, y, [&](int64_t, acc_t r) { acc += e.value(r); },
      [&](int64_t, const acc_t* r) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc += e.value(r[k]);
      });

  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const acc_t block_sum = BlockReduce(storage).Sum(acc);
  if (threadIdx.x == 0) partial[b * gridDim.y + blockIdx.y] = block_sum;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(
    const acc_t* __restrict__ partial, int64_t segments, int64_t B, int64_t D, math::TransformKind transform,
    double transform_param, bool mean_over_elements, Reduction reduction, const acc_t* __restrict__ scale,
    const acc_t* __restrict__ weight, acc_t* __restrict__ loss, acc_t* __restrict__ penalty,
    acc_t* __restrict__ influence) {
  double total = 0.0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    double sum = 0.0;
    for (int64_t k = 0; k < segments; ++k) sum += static_cast<double>(partial[b * segments + k]);
    const math::SampleForward s = math::sample_forward(transform, transform_param, sum, D, mean_over_elements,
                                                       scale[b], weight != nullptr ? static_cast<double>(weight[b]) : 1.0);
    penalty[b] = static_cast<acc_t>(s.penalty);
    influence[b] = static_cast<acc_t>(s.influence);
    if (reduction == Reduction::None) {
      loss[b] = static_cast<acc_t>(s.loss);
    } else {
      total += s.loss;
    }
  }
  if (reduction == Reduction::None) return;
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const double batch_total = BlockReduce(storage).Sum(total);
  if (threadIdx.x == 0) {
    loss[0] = static_cast<acc_t>(reduction == Reduction::Mean ? batch_total / static_cast<double>(B) : batch_total);
  }
}

template <typename Penalty, typename acc_t, typename in_t, typename tgt_t>
__global__ void __launch_bounds__(kThreads) grad_input_kernel(
    const in_t* __restrict__ input, const tgt_t* __restrict__ target, const acc_t* __restrict__ c,
    double penalty_param, const acc_t* __restrict__ grad_per_sample, const acc_t* __restrict__ influence,
    const acc_t* __restrict__ scale, const acc_t* __restrict__ weight, int64_t D, int64_t segment,
    bool mean_over_elements, in_t* __restrict__ grad_input) {
  constexpr int VEC = vector_width<in_t>();
  const int64_t b = blockIdx.x;
  const Penalty e = Penalty::make(penalty_param, c != nullptr ? static_cast<double>(c[b]) : 0.0);
  const acc_t coef = static_cast<acc_t>(math::sample_grad_coefficient(
      grad_per_sample[b], weight != nullptr ? static_cast<double>(weight[b]) : 1.0, influence[b], scale[b], D,
      mean_over_elements));
  const in_t* x = input + b * D;
  const tgt_t* y = target + b * D;
  in_t* out = grad_input + b * D;
  const int64_t begin = blockIdx.y * segment;
  const Segment<VEC, in_t, tgt_t> s(x, y, out, min64(begin, D), min64(begin + segment, D));

  for_each_residual<VEC, acc_t>(
      s, x, y, [&](int64_t i, acc_t r) { out[i] = static_cast<in_t>(coef * e.grad(r)); },
      [&](int64_t i, const acc_t* r) {
        Pack<in_t, VEC> g;
#pragma unroll
        for (int k = 0; k < VEC; ++k) g.v[k] = static_cast<in_t>(coef * e.grad(r[k]));
        *reinterpret_cast<Pack<in_t, VEC>*>(out + i) = g;
      });
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_cuda(const LossConfig& config, const LossInputs& in) {
  const c10::cuda::CUDAGuard guard(in.input.device());
  auto [loss, penalty, influence] = allocate_outputs(config, in);
  const int64_t B = in.batch, D = in.numel_per_sample;
  const int64_t segments = segments_per_sample(B, D);
  const int64_t segment = (D + segments - 1) / segments;
  const at::Tensor partial = at::empty({B * segments}, in.input.options().dtype(in.compute_dtype));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_loss_kernel(config, in, [&]<typename Penalty, typename acc_t, typename in_t, typename tgt_t>() {
    penalty_partial_sums_kernel<Penalty, acc_t, in_t, tgt_t><<<dim3(B, segments), kThreads, 0, stream>>>(
        in.input.const_data_ptr<in_t>(), in.target.const_data_ptr<tgt_t>(), optional_ptr<acc_t>(in.c),
        config.penalty_param, D, segment, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), segments, B, D, config.transform, config.transform_param,
        config.mean_over_elements, config.reduction, in.scale.const_data_ptr<acc_t>(), optional_ptr<acc_t>(in.weight),
        loss.mutable_data_ptr<acc_t>(), penalty.mutable_data_ptr<acc_t>(), influence.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, penalty, influence};
}

at::Tensor loss_backward_cuda(const LossConfig& config, const LossInputs& in, const at::Tensor& grad_per_sample,
                              const at::Tensor& influence) {
  const c10::cuda::CUDAGuard guard(in.input.device());
  at::Tensor grad_input = at::empty_like(in.input, at::MemoryFormat::Contiguous);
  const int64_t B = in.batch, D = in.numel_per_sample;
  const int64_t segments = segments_per_sample(B, D);
  const int64_t segment = (D + segments - 1) / segments;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_loss_kernel(config, in, [&]<typename Penalty, typename acc_t, typename in_t, typename tgt_t>() {
    grad_input_kernel<Penalty, acc_t, in_t, tgt_t><<<dim3(B, segments), kThreads, 0, stream>>>(
        in.input.const_data_ptr<in_t>(), in.target.const_data_ptr<tgt_t>(), optional_ptr<acc_t>(in.c),
        config.penalty_param, grad_per_sample.const_data_ptr<acc_t>(), influence.const_data_ptr<acc_t>(),
        in.scale.const_data_ptr<acc_t>(), optional_ptr<acc_t>(in.weight), D, segment, config.mean_over_elements,
        grad_input.mutable_data_ptr<in_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, CUDA, m) { register_loss_kernels<&loss_forward_cuda, &loss_backward_cuda>(m); }

}  // namespace robust_diffusion
