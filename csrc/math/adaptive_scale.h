// The adaptive scale's running state, one bucket at a time (docs/DESIGN.md, Scale): what the CPU and CUDA
// kernels of adaptive_scale_update (cpu/adaptive_scale_kernel.cpp, cuda/adaptive_scale_kernel.cu) apply to each
// bucket. Torch-free, host and device.
//
// The batch statistic is float32 [2K + 1]: per bucket the sum of the accepted bucket medians it holds and their
// count (one batch: 1 or 0; several ranks or staged forward passes add up), then how many batches were refused.
// It is what ranks all-reduce and what update="step" stages, by plain addition.
#pragma once

#include <cmath>

#include "host_device.h"

namespace robust_diffusion {
namespace math {

// Every float32 operation below is rounded on its own, as the float32 tensor operations that defined the
// state first were (and on every compiler: no fused multiply-add). The double product of two floats is
// exact, the double sum of two floats rounds to float innocuously (53 >= 2 * 24 + 2 bits), and the conversion
// to float between them keeps the compiler from contracting a multiply and an add.
RD_HOST_DEVICE inline float mul_rn(float a, float b) { return static_cast<float>(static_cast<double>(a) * b); }
RD_HOST_DEVICE inline float add_rn(float a, float b) { return static_cast<float>(static_cast<double>(a) + b); }
RD_HOST_DEVICE inline bool is_nan(float x) { return x != x; }

// The bucket's median this statistic reports: the mean of its accepted medians, NaN when it has none.
RD_HOST_DEVICE inline float statistic_median(float total, float count) {
  return count > 0.0f ? total / (count > 1.0f ? count : 1.0f) : NAN;
}

struct BucketUpdate {
  float value;   // the bucket's new running penalty
  bool limited;  // the median was clamped to max_ratio times the bucket's value
};

// One bucket's new value. median: this update's (NaN when the bucket has none); seed: the median over the buckets
// that have one (NaN when none has); initialized: the state has been seeded before. The first statistic seeds
// the bucket (with the seed where it has no median of its own); later ones are clamped to max_ratio times the
// value upward (downward the EMA already moves it by at most a factor momentum) and averaged in with the EMA.
// Never below floor.
RD_HOST_DEVICE inline BucketUpdate update_bucket(float current, float median, float seed, bool initialized,
                                                 float momentum, float one_minus_momentum, float max_ratio,
                                                 float floor) {
  const bool present = !is_nan(median);
  float value = current;
  bool limited = false;
  if (!initialized) {
    if (present) {
      value = median;
    } else if (!is_nan(seed)) {
      value = seed;
    }
  } else if (present) {
    const float cap = mul_rn(current, max_ratio);
    const float bounded = median < cap ? median : cap;
    limited = bounded != median;
    value = add_rn(mul_rn(momentum, current), mul_rn(one_minus_momentum, bounded));
  }
  return {value > floor ? value : floor, limited};
}

}  // namespace math
}  // namespace robust_diffusion
