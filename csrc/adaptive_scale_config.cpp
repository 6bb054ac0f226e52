// Argument validation of the adaptive scale's operators, shared by the CPU, CUDA and Meta kernels.
#include "adaptive_scale_config.h"

#include <cmath>

#include "dtypes.h"

namespace robust_diffusion {
namespace {

bool is_integer(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_floor(const char* op, double floor) {
  TORCH_CHECK_VALUE(std::isfinite(floor) && floor >= 0, op, ": floor must be finite and non-negative, got ", floor);
}

void check_scalar_state(const char* argument, const at::Tensor& value, at::ScalarType dtype,
                        const at::Tensor& bucket_penalty) {
  TORCH_CHECK_VALUE(value.dim() == 0, "adaptive_scale_update: ", argument, " must be a 0-dim tensor, got shape ",
                    value.sym_sizes());
  TORCH_CHECK_TYPE(value.scalar_type() == dtype, "adaptive_scale_update: ", argument, " must be ", dtype, ", got ",
                   value.scalar_type());
  TORCH_CHECK_VALUE(value.device() == bucket_penalty.device(), "adaptive_scale_update: ", argument,
                    " must be on bucket_penalty's device (", bucket_penalty.device(), "), got ", value.device());
}

}  // namespace

void check_statistic_arguments(const at::Tensor& penalty, const at::Tensor& bucket, int64_t num_buckets,
                               double floor) {
  constexpr const char* op = "bucket_statistic";
  TORCH_CHECK_VALUE(penalty.dim() == 1, op, ": penalty must be 1-D (one value per sample), got shape ",
                    penalty.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_float(penalty.scalar_type()), op,
                   ": penalty must be float32, float64, float16 or bfloat16, got ", penalty.scalar_type());
  TORCH_CHECK_VALUE(bucket.dim() == 1 && bucket.sym_size(0) == penalty.sym_size(0), op,
                    ": bucket must have one value per sample of penalty, shape [", penalty.sym_size(0), "], got shape ",
                    bucket.sym_sizes());
  TORCH_CHECK_TYPE(is_integer(bucket.scalar_type()), op, ": bucket must be int32 or int64, got ", bucket.scalar_type());
  TORCH_CHECK_VALUE(bucket.device() == penalty.device(), op, ": bucket must be on penalty's device (", penalty.device(),
                    "), got ", bucket.device());
  TORCH_CHECK_VALUE(num_buckets >= 1, op, ": num_buckets must be positive, got ", num_buckets);
  check_floor(op, floor);
}

void check_update_arguments(const at::Tensor& bucket_penalty, const at::Tensor& initialized,
                            const at::Tensor& skipped_updates, const at::Tensor& limited_updates,
                            const at::Tensor& statistic, const std::optional<at::Tensor>& ok, double momentum,
                            double max_ratio, double floor) {
  constexpr const char* op = "adaptive_scale_update";
  TORCH_CHECK_VALUE(bucket_penalty.dim() == 1 && bucket_penalty.sym_size(0) >= 1, op,
                    ": bucket_penalty must be 1-D with one value per bucket, got shape ", bucket_penalty.sym_sizes());
  TORCH_CHECK_TYPE(bucket_penalty.scalar_type() == at::kFloat, op, ": bucket_penalty must be float32, got ",
                   bucket_penalty.scalar_type());
  TORCH_CHECK_VALUE(bucket_penalty.is_contiguous(), op, ": bucket_penalty must be contiguous (it is updated in place)");
  check_scalar_state("initialized", initialized, at::kBool, bucket_penalty);
  check_scalar_state("skipped_updates", skipped_updates, at::kLong, bucket_penalty);
  check_scalar_state("limited_updates", limited_updates, at::kLong, bucket_penalty);
  TORCH_CHECK_VALUE(statistic.dim() == 1 && statistic.sym_size(0) == 2 * bucket_penalty.sym_size(0) + 1, op,
                    ": statistic must be bucket_statistic's [2 * ", bucket_penalty.sym_size(0), " + 1] for ",
                    bucket_penalty.sym_size(0), " buckets, got shape ", statistic.sym_sizes());
  TORCH_CHECK_TYPE(statistic.scalar_type() == at::kFloat, op, ": statistic must be float32, got ",
                   statistic.scalar_type());
  TORCH_CHECK_VALUE(statistic.device() == bucket_penalty.device(), op, ": statistic must be on bucket_penalty's device (",
                    bucket_penalty.device(), "), got ", statistic.device());
  if (ok.has_value() && ok->defined()) {
    TORCH_CHECK_TYPE(ok->scalar_type() == at::kBool, op, ": ok must be a bool tensor (e.g. torch.isfinite(grad_norm)), got ",
                     ok->scalar_type());
    TORCH_CHECK_VALUE(ok->sym_numel() == 1, op, ": ok must have one element, got shape ", ok->sym_sizes());
    TORCH_CHECK_VALUE(ok->device() == bucket_penalty.device(), op, ": ok must be on bucket_penalty's device (",
                      bucket_penalty.device(), "), got ", ok->device());
  }
  TORCH_CHECK_VALUE(momentum >= 0 && momentum < 1, op, ": momentum must lie in [0, 1), got ", momentum);
  TORCH_CHECK_VALUE(std::isfinite(max_ratio) && max_ratio >= 1, op, ": max_ratio must be finite and at least 1, got ",
                    max_ratio);
  check_floor(op, floor);
}

}  // namespace robust_diffusion
