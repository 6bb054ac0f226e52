// The floating-point dtypes every operator accepts for its tensors, in one place.
#pragma once

#include <c10/core/ScalarType.h>

namespace robust_diffusion {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace robust_diffusion
