// CUDA kernels of the adaptive scale's operators (adaptive_scale_config.h; the per-bucket rule in
// math/adaptive_scale.h, the one the CPU kernels apply). No host sync: refusals and the ok flag are read on the device.
//
// bucket_statistic ranks each sample among its bucket's samples by (value, index), so exactly one sample of each
// bucket has the lower middle rank and writes the median: O(B^2) comparisons spread over B threads, no sort, the
// same value as the CPU kernel's (meant for batches of up to a few thousand). A second, one-block kernel applies
// the acceptance rules.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../adaptive_scale_config.h"
#include "../math/adaptive_scale.h"
#include "launch.cuh"

namespace robust_diffusion {
namespace {

using cuda::kThreads;

// statistic: zeros on entry. Each bucket's median sample writes its value to total[k] and the bucket's size to
// count[k]; any non-finite penalty sets refused to 1. The block reads the batch through shared memory, a tile at
// a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bucket_medians_kernel(const scalar_t* __restrict__ penalty,
                                                                  const int64_t* __restrict__ bucket, int64_t B,
                                                                  int64_t K, float* __restrict__ statistic) {
  __shared__ int64_t tile_bucket[kThreads];
  __shared__ float tile_value[kThreads];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool mine = i < B;  // threads past the batch still load tiles
  const int64_t k = mine ? bucket[i] : -1;
  const float value = mine ? static_cast<float>(penalty[i]) : 0.0f;
  if (mine) {
    CUDA_KERNEL_ASSERT(k >= 0 && k < K && "bucket_statistic: bucket must lie in [0, num_buckets)");
    if (!isfinite(static_cast<double>(penalty[i]))) statistic[2 * K] = 1.0f;
  }
  int64_t rank = 0, size = 0;
  for (int64_t base = 0; base < B; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    if (j < B) {
      tile_bucket[threadIdx.x] = bucket[j];
      tile_value[threadIdx.x] = static_cast<float>(penalty[j]);
    }
    __syncthreads();
    const int64_t tile = B - base < kThreads ? B - base : kThreads;
    for (int64_t jj = 0; jj < tile; ++jj) {
      if (tile_bucket[jj] != k) continue;
      const float other = tile_value[jj];
      ++size;
      rank += (other < value || (other == value && base + jj < i)) ? 1 : 0;
    }
    __syncthreads();
  }
  if (mine && rank == (size - 1) / 2) {
    statistic[k] = value;
    statistic[K + k] = static_cast<float>(size);
  }
}

// One block: a bucket is accepted when it has samples, no penalty of the batch was non-finite, and its median is
// finite and at least floor; a batch with no accepted bucket is refused.
__global__ void __launch_bounds__(kThreads) accept_medians_kernel(int64_t K, float floor, float* __restrict__ statistic) {
  __shared__ int any_accepted;
  if (threadIdx.x == 0) any_accepted = 0;
  __syncthreads();
  const bool finite = statistic[2 * K] == 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const float median = statistic[k];
    const bool accepted = finite && statistic[K + k] > 0.0f && isfinite(median) && median >= floor;
    statistic[k] = accepted ? median : 0.0f;
    statistic[K + k] = accepted ? 1.0f : 0.0f;
    if (accepted) any_accepted = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) statistic[2 * K] = any_accepted ? 0.0f : 1.0f;
}

at::Tensor bucket_statistic_cuda(const at::Tensor& penalty, const at::Tensor& bucket, int64_t num_buckets,
                                 double floor) {
  check_statistic_arguments(penalty, bucket, num_buckets, floor);
  const c10::cuda::CUDAGuard guard(penalty.device());
  const int64_t B = penalty.size(0), K = num_buckets;
  const at::Tensor values = penalty.contiguous();
  const at::Tensor buckets = bucket.to(at::kLong).contiguous();
  at::Tensor statistic = at::zeros({statistic_size(K)}, penalty.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "bucket_statistic_cuda", [&] {
      bucket_medians_kernel<scalar_t><<<static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          values.const_data_ptr<scalar_t>(), buckets.const_data_ptr<int64_t>(), B, K,
          statistic.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  accept_medians_kernel<<<1, kThreads, 0, stream>>>(K, static_cast<float>(floor), statistic.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return statistic;
}

// One block. The seed (the lower middle of the present medians) is found by rank as above; then every bucket is
// updated by math::update_bucket and the counters by the block's totals.
__global__ void __launch_bounds__(kThreads) update_kernel(float* __restrict__ state, bool* __restrict__ initialized,
                                                          int64_t* __restrict__ skipped, int64_t* __restrict__ limited,
                                                          const float* __restrict__ statistic,
                                                          const bool* __restrict__ ok, int64_t K, float momentum,
                                                          float one_minus_momentum, float max_ratio, float floor) {
  __shared__ float seed;
  __shared__ int any_count, any_present, limited_count;
  if (threadIdx.x == 0) {
    seed = NAN;
    any_count = any_present = limited_count = 0;
  }
  __syncthreads();
  const bool keep = ok == nullptr || *ok;
  const float* count = statistic + K;
  auto median_of = [&](int64_t k) { return keep ? math::statistic_median(statistic[k], count[k]) : NAN; };
  int64_t present = 0;
  for (int64_t j = 0; j < K; ++j) present += math::is_nan(median_of(j)) ? 0 : 1;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    if (count[k] > 0.0f) any_count = 1;
    const float value = median_of(k);
    if (math::is_nan(value)) continue;
    any_present = 1;
    int64_t rank = 0;
    for (int64_t j = 0; j < K; ++j) {
      const float other = median_of(j);
      rank += (!math::is_nan(other) && (other < value || (other == value && j < k))) ? 1 : 0;
    }
    if (rank == (present - 1) / 2) seed = value;
  }
  __syncthreads();
  const bool was_initialized = *initialized;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const math::BucketUpdate u =
        math::update_bucket(state[k], median_of(k), seed, was_initialized, momentum, one_minus_momentum, max_ratio, floor);
    state[k] = u.value;
    if (u.limited) atomicAdd(&limited_count, 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *skipped += llrintf(statistic[2 * K]) + (!keep && any_count ? 1 : 0);
    *limited += limited_count;
    *initialized = was_initialized || any_present;
  }
}

void adaptive_scale_update_cuda(const at::Tensor& bucket_penalty, const at::Tensor& initialized,
                                const at::Tensor& skipped_updates, const at::Tensor& limited_updates,
                                const at::Tensor& statistic, const std::optional<at::Tensor>& ok, double momentum,
                                double max_ratio, double floor) {
  check_update_arguments(bucket_penalty, initialized, skipped_updates, limited_updates, statistic, ok, momentum,
                         max_ratio, floor);
  const c10::cuda::CUDAGuard guard(bucket_penalty.device());
  const at::Tensor stat = statistic.contiguous();
  const bool has_ok = ok.has_value() && ok->defined();
  const at::Tensor flag = has_ok ? ok->reshape({1}).contiguous() : at::Tensor();
  update_kernel<<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      bucket_penalty.mutable_data_ptr<float>(), initialized.mutable_data_ptr<bool>(),
      skipped_updates.mutable_data_ptr<int64_t>(), limited_updates.mutable_data_ptr<int64_t>(),
      stat.const_data_ptr<float>(), has_ok ? flag.const_data_ptr<bool>() : nullptr, bucket_penalty.size(0),
      static_cast<float>(momentum), static_cast<float>(1.0 - momentum), static_cast<float>(max_ratio),
      static_cast<float>(floor));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, CUDA, m) {
  m.impl("bucket_statistic", &bucket_statistic_cuda);
  m.impl("adaptive_scale_update", &adaptive_scale_update_cuda);
}

}  // namespace robust_diffusion
