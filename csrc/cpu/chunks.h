// How the CPU kernels cut their work: fixed chunks whatever the thread count, so results (and the order of
// every sum) do not depend on it; and the cache size that decides how the one-pass kernel stores a gradient.
#pragma once

#include <cstdint>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace robust_diffusion {
namespace cpu {

constexpr int64_t kChunk = 16384;  // elements per task

// The last-level cache's size (glibc's sysconf), 32 MB where it cannot be read: beyond it the one-pass gradient
// is streamed past the caches (loss_kernel.h, stream2).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long size = sysconf(_SC_LEVEL3_CACHE_SIZE);
#else
    const long size = 0;
#endif
    return size > 0 ? static_cast<int64_t>(size) : int64_t{32} << 20;
  }();
  return bytes;
}

}  // namespace cpu
}  // namespace robust_diffusion
