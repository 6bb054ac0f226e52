// The CPU kernel skeleton for every loss: a fused per-sample reduction (forward) and an elementwise
// backward, templated on the penalty e(r) (math/penalties.h); the per-sample transform is
// math/transforms.h. Vectorised with at::vec::Vectorized, whose width is set by the CPU_CAPABILITY the
// including translation unit is compiled for (cpu/isa/*.cpp, one per instruction set, as in ATen);
// cpu/loss_kernel.cpp picks one at run time.
//
// Determinism: each sample is cut into fixed chunks of kChunk elements whatever the thread count;
// a chunk is summed with SIMD accumulators in a fixed order, and chunk sums are added in order in
// double. The result is bitwise reproducible run to run and across thread counts on one machine
// (two instruction sets sum in different lane orders, so they agree to rounding, not bitwise).
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/loss_kernel.h from a cpu/isa/*.cpp file, which names the instruction set"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

#include "../kernel_dispatch.h"
#include "chunks.h"
#include "../loss_config.h"

namespace robust_diffusion {
namespace math {

// SIMD versions of the operations the penalties use (the scalar ones are in penalties.h).
template <typename S>
struct VecOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V abs(const V& x) { return x.abs(); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V where_abs_less(const V& r, const V& bound, const V& x) { return V::blendv(V(S(0)), x, r.abs() < bound); }
};

}  // namespace math

namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Two compute-type vectors (2 * Vectorized<acc_t>::size() elements) from memory of type T.
template <typename acc_t, typename T>
inline void load2(const T* p, Vectorized<acc_t>& a, Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<acc_t, T>) {
    a = Vectorized<acc_t>::loadu(p);
    b = Vectorized<acc_t>::loadu(p + Vectorized<acc_t>::size());
  } else {
    at::vec::load_to_float<T>(p, a, b);
  }
}

template <typename acc_t, typename T>
inline void store2(T* p, const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<acc_t, T>) {
    a.store(p);
    b.store(p + Vectorized<acc_t>::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

template <typename acc_t>
constexpr int64_t kBlock = 2 * Vectorized<acc_t>::size();

template <typename Penalty, typename acc_t>
Penalty penalty_for_sample(const LossConfig& config, const acc_t* c, int64_t b) {
  return Penalty::make(config.penalty_param, c != nullptr ? static_cast<double>(c[b]) : 0.0);
}

// Sum of e(input - target) over [begin, end): SIMD accumulators, then a scalar tail, in a fixed order.
template <typename acc_t, typename in_t, typename tgt_t, typename Penalty>
double chunk_penalty_sum(const Penalty& e, const in_t* x, const tgt_t* y, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  Vec acc0(acc_t(0)), acc1(acc_t(0));
  int64_t i = begin;
  for (; i + kBlock<acc_t> <= end; i += kBlock<acc_t>) {
    Vec x0, x1, y0, y1;
    load2<acc_t>(x + i, x0, x1);
    load2<acc_t>(y + i, y0, y1);
    acc0 += e.template value<Vec>(x0 - y0);
    acc1 += e.template value<Vec>(x1 - y1);
  }
  acc_t lanes[Vec::size()];
  (acc0 + acc1).store(lanes);
  acc_t sum = acc_t(0);
  for (int64_t l = 0; l < Vec::size(); ++l) sum += lanes[l];
  for (; i < end; ++i) sum += e.value(static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]));
  return static_cast<double>(sum);
}

template <typename Penalty, typename acc_t, typename in_t, typename tgt_t>
void forward_kernel(const LossConfig& config, const LossInputs& in, at::Tensor& loss, at::Tensor& penalty,
                    at::Tensor& influence) {
  const int64_t B = in.batch, D = in.numel_per_sample;
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const in_t* x = in.input.const_data_ptr<in_t>();
  const tgt_t* y = in.target.const_data_ptr<tgt_t>();
  const acc_t* c = in.c.defined() ? in.c.const_data_ptr<acc_t>() : nullptr;

  std::vector<double> partial(B * chunks);
  at::parallel_for(0, B * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      const Penalty e = penalty_for_sample<Penalty>(config, c, b);
      const int64_t offset = b * D;
      partial[task] = chunk_penalty_sum<acc_t>(e, x + offset, y + offset, k * kChunk, std::min(D, (k + 1) * kChunk));
    }
  });

  const acc_t* scale = in.scale.const_data_ptr<acc_t>();
  const acc_t* weight = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;
  acc_t* penalty_out = penalty.mutable_data_ptr<acc_t>();
  acc_t* influence_out = influence.mutable_data_ptr<acc_t>();
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += partial[b * chunks + k];
    const math::SampleForward s = math::sample_forward(config.transform, config.transform_param, sum, D,
                                                       config.mean_over_elements, scale[b],
                                                       weight != nullptr ? static_cast<double>(weight[b]) : 1.0);
    penalty_out[b] = static_cast<acc_t>(s.penalty);
    influence_out[b] = static_cast<acc_t>(s.influence);
    if (config.reduction == Reduction::None) {
      loss_out[b] = static_cast<acc_t>(s.loss);
    } else {
      total += s.loss;
    }
  }
  if (config.reduction != Reduction::None) {
    loss_out[0] = static_cast<acc_t>(config.reduction == Reduction::Mean ? total / static_cast<double>(B) : total);
  }
}

template <typename Penalty, typename acc_t, typename in_t, typename tgt_t>
void backward_kernel(const LossConfig& config, const LossInputs& in, const at::Tensor& grad_per_sample,
                     const at::Tensor& influence, at::Tensor& grad_input) {
  using Vec = Vectorized<acc_t>;
  const int64_t B = in.batch, D = in.numel_per_sample;
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const in_t* x = in.input.const_data_ptr<in_t>();
  const tgt_t* y = in.target.const_data_ptr<tgt_t>();
  in_t* out = grad_input.mutable_data_ptr<in_t>();
  const acc_t* c = in.c.defined() ? in.c.const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_per_sample.const_data_ptr<acc_t>();
  const acc_t* w = influence.const_data_ptr<acc_t>();
  const acc_t* scale = in.scale.const_data_ptr<acc_t>();
  const acc_t* weight = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, B * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      const Penalty e = penalty_for_sample<Penalty>(config, c, b);
      const acc_t coef = static_cast<acc_t>(math::sample_grad_coefficient(
          g[b], weight != nullptr ? static_cast<double>(weight[b]) : 1.0, w[b], scale[b], D,
          config.mean_over_elements));
      const int64_t end = b * D + std::min(D, (k + 1) * kChunk);
      int64_t i = b * D + k * kChunk;
      const Vec coef_v(coef);
      for (; i + kBlock<acc_t> <= end; i += kBlock<acc_t>) {
        Vec x0, x1, y0, y1;
        load2<acc_t>(x + i, x0, x1);
        load2<acc_t>(y + i, y0, y1);
        store2<acc_t>(out + i, coef_v * e.template grad<Vec>(x0 - y0), coef_v * e.template grad<Vec>(x1 - y1));
      }
      for (; i < end; ++i) {
        out[i] = static_cast<in_t>(coef * e.grad(static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i])));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const LossConfig& config, const LossInputs& in) {
  auto [loss, penalty, influence] = allocate_outputs(config, in);
  dispatch_loss_kernel(config, in, [&]<typename Penalty, typename acc_t, typename in_t, typename tgt_t>() {
    forward_kernel<Penalty, acc_t, in_t, tgt_t>(config, in, loss, penalty, influence);
  });
  return {loss, penalty, influence};
}

at::Tensor loss_backward(const LossConfig& config, const LossInputs& in, const at::Tensor& grad_per_sample,
                         const at::Tensor& influence) {
  at::Tensor grad_input = at::empty_like(in.input, at::MemoryFormat::Contiguous);
  dispatch_loss_kernel(config, in, [&]<typename Penalty, typename acc_t, typename in_t, typename tgt_t>() {
    backward_kernel<Penalty, acc_t, in_t, tgt_t>(config, in, grad_per_sample, influence, grad_input);
  });
  return grad_input;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace robust_diffusion
