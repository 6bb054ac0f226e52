// The adaptive scale's two operators (docs/DESIGN.md, Scale), which RobustDiffusionLoss calls once per training
// batch and once per step in place of some forty small tensor operations:
//
//   bucket_statistic(penalty, bucket, num_buckets, floor) -> statistic
//       penalty R_b [B] (any float dtype), bucket [B] (int32 / int64, in [0, num_buckets)): the batch's
//       statistic, float32 [2K + 1] (math/adaptive_scale.h): per bucket its median penalty (the lower middle
//       value, as torch.nanmedian) with count 1, or 0 and 0 where the bucket has no sample or a median below floor;
//       a batch with a non-finite penalty is refused whole (all zeros, refused = 1), as is one left with no bucket.
//   adaptive_scale_update(bucket_penalty!, initialized!, skipped_updates!, limited_updates!, statistic, ok,
//                         momentum, max_ratio, floor)
//       takes a statistic (summed over ranks or staged passes) into the state in place: bucket_penalty float32
//       [K], initialized bool [], the counters int64 []. ok (bool, one element, or None): false drops the
//       statistic and counts the step as skipped. No host sync on an accelerator.
//
// Neither has a gradient: their autograd kernel refuses inputs that require one (autograd/adaptive_scale_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace robust_diffusion {

// The checks that need no data (shapes, dtypes, devices, the numbers), shared by the real and Meta kernels, with
// messages that name the argument. Symbolic shapes are fine.
void check_statistic_arguments(const at::Tensor& penalty, const at::Tensor& bucket, int64_t num_buckets, double floor);
void check_update_arguments(const at::Tensor& bucket_penalty, const at::Tensor& initialized,
                            const at::Tensor& skipped_updates, const at::Tensor& limited_updates,
                            const at::Tensor& statistic, const std::optional<at::Tensor>& ok, double momentum,
                            double max_ratio, double floor);

// The statistic's length for K buckets.
inline int64_t statistic_size(int64_t num_buckets) { return 2 * num_buckets + 1; }

}  // namespace robust_diffusion
