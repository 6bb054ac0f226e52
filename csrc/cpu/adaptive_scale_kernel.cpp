// CPU kernels of the adaptive scale's operators (adaptive_scale_config.h; the per-bucket rule in
// math/adaptive_scale.h). Both are tiny (B penalties, K buckets) and run on one thread.
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../adaptive_scale_config.h"
#include "../math/adaptive_scale.h"

namespace robust_diffusion {
namespace {

// The lower middle value of values (torch.nanmedian's choice), reordering them; NaN when there are none.
float lower_median(std::vector<float>& values) {
  if (values.empty()) return std::numeric_limits<float>::quiet_NaN();
  const auto middle = values.begin() + static_cast<std::ptrdiff_t>((values.size() - 1) / 2);
  std::nth_element(values.begin(), middle, values.end());
  return *middle;
}

at::Tensor bucket_statistic_cpu(const at::Tensor& penalty, const at::Tensor& bucket, int64_t num_buckets,
                                double floor) {
  check_statistic_arguments(penalty, bucket, num_buckets, floor);
  const int64_t B = penalty.size(0), K = num_buckets;
  const at::Tensor buckets = bucket.to(at::kLong).contiguous();
  const int64_t* k_of = buckets.const_data_ptr<int64_t>();
  if (B > 0) {
    const auto [low, high] = std::minmax_element(k_of, k_of + B);
    TORCH_CHECK_VALUE(*low >= 0 && *high < K, "bucket_statistic: bucket must lie in [0, ", K,
                      ") (num_buckets), got values in [", *low, ", ", *high, "]");
  }
  at::Tensor statistic = at::zeros({statistic_size(K)}, penalty.options().dtype(at::kFloat));
  float* total = statistic.mutable_data_ptr<float>();
  float* count = total + K;
  float* refused = total + 2 * K;

  // Each bucket's penalties as float32; a non-finite one (in its own dtype) refuses the whole batch (an
  // overflowed forward pass, NaN data).
  std::vector<std::vector<float>> members(static_cast<size_t>(K));
  bool finite = true;
  const at::Tensor values = penalty.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "bucket_statistic_cpu", [&] {
    const scalar_t* p = values.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      finite = finite && std::isfinite(static_cast<double>(p[b]));
      members[k_of[b]].push_back(static_cast<float>(p[b]));
    }
  });
  bool any_accepted = false;
  for (int64_t k = 0; finite && k < K; ++k) {
    const float median = lower_median(members[k]);  // NaN for an empty bucket
    if (std::isfinite(median) && median >= static_cast<float>(floor)) {
      total[k] = median;
      count[k] = 1.0f;
      any_accepted = true;
    }
  }
  *refused = any_accepted ? 0.0f : 1.0f;
  return statistic;
}

void adaptive_scale_update_cpu(const at::Tensor& bucket_penalty, const at::Tensor& initialized,
                               const at::Tensor& skipped_updates, const at::Tensor& limited_updates,
                               const at::Tensor& statistic, const std::optional<at::Tensor>& ok, double momentum,
                               double max_ratio, double floor) {
  check_update_arguments(bucket_penalty, initialized, skipped_updates, limited_updates, statistic, ok, momentum,
                         max_ratio, floor);
  const int64_t K = bucket_penalty.size(0);
  const at::Tensor stat = statistic.contiguous();
  const float* total = stat.const_data_ptr<float>();
  const float* count = total + K;
  const bool keep = !(ok.has_value() && ok->defined()) || ok->item<bool>();

  std::vector<float> medians(static_cast<size_t>(K)), present;
  bool any_count = false;
  for (int64_t k = 0; k < K; ++k) {
    any_count = any_count || count[k] > 0.0f;
    medians[k] = keep ? math::statistic_median(total[k], count[k]) : std::numeric_limits<float>::quiet_NaN();
    if (!math::is_nan(medians[k])) present.push_back(medians[k]);
  }
  int64_t refused = std::llround(total[2 * K]) + (!keep && any_count ? 1 : 0);
  const float seed = lower_median(present);

  float* state = bucket_penalty.mutable_data_ptr<float>();
  bool* seeded = initialized.mutable_data_ptr<bool>();
  int64_t limited = 0;
  for (int64_t k = 0; k < K; ++k) {
    const math::BucketUpdate u =
        math::update_bucket(state[k], medians[k], seed, *seeded, static_cast<float>(momentum),
                            static_cast<float>(1.0 - momentum), static_cast<float>(max_ratio), static_cast<float>(floor));
    state[k] = u.value;
    limited += u.limited ? 1 : 0;
  }
  *skipped_updates.mutable_data_ptr<int64_t>() += refused;
  *limited_updates.mutable_data_ptr<int64_t>() += limited;
  *seeded = *seeded || !present.empty();
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, CPU, m) {
  m.impl("bucket_statistic", &bucket_statistic_cpu);
  m.impl("adaptive_scale_update", &adaptive_scale_update_cpu);
}

}  // namespace robust_diffusion
