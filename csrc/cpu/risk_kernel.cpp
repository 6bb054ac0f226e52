// CPU kernel of risk_noising: elementwise (math/risk_noising.h), parallel over fixed chunks of each sample.
// Every element is computed on its own, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../risk_config.h"
#include "chunks.h"

namespace robust_diffusion {
namespace {

using cpu::kChunk;

template <typename scalar_t, typename acc_t>
void risk_noising_kernel(const RiskInputs& in, at::Tensor& noisy, at::Tensor& target, at::Tensor& noise_std) {
  const int64_t B = in.batch, D = in.numel_per_sample;
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const scalar_t* x = in.sample.const_data_ptr<scalar_t>();
  const scalar_t* eta = in.noise.const_data_ptr<scalar_t>();
  const acc_t* risk = in.risk.const_data_ptr<acc_t>();
  const acc_t* alpha = in.alpha.defined() ? in.alpha.const_data_ptr<acc_t>() : nullptr;
  const acc_t* sigma = in.sigma.const_data_ptr<acc_t>();
  scalar_t* noisy_out = noisy.mutable_data_ptr<scalar_t>();
  scalar_t* target_out = target.mutable_data_ptr<scalar_t>();
  acc_t* std_out = noise_std.mutable_data_ptr<acc_t>();
  const acc_t sqrt_c = static_cast<acc_t>(in.sqrt_c);
  const bool per_element = in.per_element_risk;

  at::parallel_for(0, B * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      const acc_t a = alpha != nullptr ? alpha[b] : acc_t(1);
      const acc_t s = sigma[b];
      const int64_t end = b * D + std::min(D, (k + 1) * kChunk);
      for (int64_t i = b * D + k * kChunk; i < end; ++i) {
        const acc_t r = per_element ? risk[i] : risk[b];
        const math::RiskNoised<acc_t> e = math::risk_noising<acc_t>(
            in.target, static_cast<acc_t>(x[i]), static_cast<acc_t>(eta[i]), r, sqrt_c, a, s);
        noisy_out[i] = static_cast<scalar_t>(e.noisy);
        target_out[i] = static_cast<scalar_t>(e.target);
        if (per_element) std_out[i] = math::risk_noise_std(r, sqrt_c, a, s);
      }
    }
  });
  if (!per_element) {
    for (int64_t b = 0; b < B; ++b) {
      std_out[b] = math::risk_noise_std(risk[b], sqrt_c, alpha != nullptr ? alpha[b] : acc_t(1), sigma[b]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising_cpu(const RiskInputs& in) {
  auto [noisy, target, noise_std] = allocate_risk_outputs(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.sample.scalar_type(), "risk_noising_cpu", [&] {
    risk_noising_kernel<scalar_t, at::opmath_type<scalar_t>>(in, noisy, target, noise_std);
  });
  return {noisy, target, noise_std};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> risk_noising_cpu_op(
    const at::Tensor& sample, const at::Tensor& risk, const at::Tensor& noise, const std::optional<at::Tensor>& alpha,
    const at::Tensor& sigma, c10::string_view prediction_type, c10::string_view perturbation) {
  return risk_noising_cpu(prepare_risk_inputs(sample, risk, noise, alpha, sigma, prediction_type, perturbation));
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, CPU, m) { m.impl("risk_noising", &risk_noising_cpu_op); }

}  // namespace robust_diffusion
