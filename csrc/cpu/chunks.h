// How the CPU kernels split a sample into tasks: fixed chunks whatever the thread count, so results (and the
// order of every sum) do not depend on it.
#pragma once

#include <cstdint>

namespace robust_diffusion {
namespace cpu {

constexpr int64_t kChunk = 16384;  // elements per task

}  // namespace cpu
}  // namespace robust_diffusion
