// Launch geometry shared by the CUDA kernels (loss_kernel.cu, risk_kernel.cu): one definition, so both cut a
// sample the same way and both respect the grid's limits.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace robust_diffusion {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kMinElementsPerBlock = 4096;  // below this a block is mostly launch overhead
constexpr int64_t kMaxGridY = 65535;            // the grid's y limit: segments of one sample

// Segments per sample (the grid's y extent): enough blocks to fill the device a few times over, none smaller than
// kMinElementsPerBlock, at most kMaxGridY. A function of (B, D, device) only, so the reduction order is fixed.
inline int64_t segments_per_sample(int64_t B, int64_t D) {
  const int64_t target_blocks = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t wanted = (target_blocks + B - 1) / B;
  const int64_t most = (D + kMinElementsPerBlock - 1) / kMinElementsPerBlock;
  return std::max<int64_t>(1, std::min<int64_t>({wanted, most, kMaxGridY}));
}

}  // namespace cuda
}  // namespace robust_diffusion
