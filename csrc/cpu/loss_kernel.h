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

#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../loss_kernel_dispatch.h"
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

// Non-temporal stores: where a call's data exceeds the last-level cache, the gradient cannot stay cached for
// whoever reads it next, and an ordinary store first reads every line it writes (write-allocate), a third of
// the one-pass kernel's traffic and a quarter of the backward kernel's, which a non-temporal store does not make
// (benchmarks/RESULTS.md, "non-temporal gradient stores where a call's data exceeds the last-level cache" and
// "non-temporal gradient stores in the two-pass backward beyond the last-level cache"). Below the cache the
// gradient is stored as usual, cached for the model's backward.
// The alignment non-temporal stores need in this build (one vector), 0 where it has none (stream2 then stores
// as store2 does).
constexpr uintptr_t kStreamAlignment =
#if defined(CPU_CAPABILITY_AVX512)
    64;
#elif defined(CPU_CAPABILITY_AVX2)
    32;
#else
    0;
#endif

// store2 with non-temporal stores (straight to memory, no read of the lines first); p kStreamAlignment-aligned.
template <typename acc_t, typename T>
inline void stream2(T* p, const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using I = __m512i;
  const auto put = [](void* q, I v) { _mm512_stream_si512(static_cast<I*>(q), v); };
#else
  using I = __m256i;
  const auto put = [](void* q, I v) { _mm256_stream_si256(static_cast<I*>(q), v); };
#endif
  if constexpr (std::is_same_v<acc_t, T>) {
    const auto bits = [](const Vectorized<acc_t>& v) {
      I out;
      static_assert(sizeof(v) == sizeof(I), "one vector register");
      std::memcpy(&out, &v, sizeof(I));
      return out;
    };
    put(p, bits(a));
    put(p + Vectorized<acc_t>::size(), bits(b));
  } else {
    const Vectorized<T> packed = at::vec::convert_from_float<T>(a, b);
    I out;
    static_assert(sizeof(packed) == sizeof(I), "one vector register");
    std::memcpy(&out, &packed, sizeof(I));
    put(p, out);
  }
#else
  store2<acc_t>(p, a, b);
#endif
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

// Asks for the cache lines of one block of T at p (a hint: it never faults).
template <typename acc_t, typename T>
inline void prefetch_block(const T* p) {
  for (size_t offset = 0; offset < kBlock<acc_t> * sizeof(T); offset += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(p) + offset);
  }
}

// grad[i] = coef * e'(input[i] - target[i]) over [begin, end) of one sample. With next (the distance to the
// next sample's data, 0 for none) it also prefetches that sample's input and target at the same offsets: the
// one-pass kernel writes a gradient from cache, and the memory would otherwise idle meanwhile (docs/DESIGN.md,
// Kernels). Samples of several chunks need their cache for themselves and get no prefetch (benchmarks/RESULTS.md,
// "prefetch the next sample in the one-pass kernel for samples of several chunks, where two fit in L2": not
// adopted). With stream, the blocks go out with non-temporal stores where out + begin is aligned for them
// (stream2); the values are the same.
// The whole blocks of [i, end) of write_chunk_grad, one loop per (prefetch, streamed) so neither is a branch in
// it; returns where the blocks end.
template <bool prefetch, bool streamed, typename acc_t, typename in_t, typename tgt_t, typename Penalty>
inline int64_t write_grad_blocks(const Penalty& e, const Vectorized<acc_t>& coef_v, const in_t* x, const tgt_t* y,
                                 in_t* out, int64_t i, int64_t end, int64_t next) {
  using Vec = Vectorized<acc_t>;
  for (; i + kBlock<acc_t> <= end; i += kBlock<acc_t>) {
    if constexpr (prefetch) {
      prefetch_block<acc_t>(x + i + next);
      prefetch_block<acc_t>(y + i + next);
    }
    Vec x0, x1, y0, y1;
    load2<acc_t>(x + i, x0, x1);
    load2<acc_t>(y + i, y0, y1);
    const Vec g0 = coef_v * e.template grad<Vec>(x0 - y0), g1 = coef_v * e.template grad<Vec>(x1 - y1);
    if constexpr (streamed) {
      stream2<acc_t>(out + i, g0, g1);
    } else {
      store2<acc_t>(out + i, g0, g1);
    }
  }
  return i;
}

template <typename acc_t, typename in_t, typename tgt_t, typename Penalty>
void write_chunk_grad(const Penalty& e, acc_t coef, const in_t* x, const tgt_t* y, in_t* out, int64_t begin,
                      int64_t end, int64_t next, bool stream) {
  const Vectorized<acc_t> coef_v(coef);
  int64_t i = begin;
  if (stream && kStreamAlignment != 0 && reinterpret_cast<uintptr_t>(out + begin) % kStreamAlignment == 0) {
    i = next != 0 ? write_grad_blocks<true, true, acc_t>(e, coef_v, x, y, out, i, end, next)
                  : write_grad_blocks<false, true, acc_t>(e, coef_v, x, y, out, i, end, next);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();  // order the streamed stores before whatever reads the gradient next
#endif
  } else {
    i = next != 0 ? write_grad_blocks<true, false, acc_t>(e, coef_v, x, y, out, i, end, next)
                  : write_grad_blocks<false, false, acc_t>(e, coef_v, x, y, out, i, end, next);
  }
  for (; i < end; ++i) out[i] = static_cast<in_t>(coef * e.grad(static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i])));
}

// One call's data as the kernels read it: the two [B, D] operands and the per-sample arguments.
template <typename acc_t, typename in_t, typename tgt_t>
struct KernelArgs {
  KernelArgs(const LossConfig& config, const LossInputs& in)
      : config(config),
        B(in.batch),
        D(in.numel_per_sample),
        chunks((in.numel_per_sample + kChunk - 1) / kChunk),
        x(in.input.const_data_ptr<in_t>()),
        y(in.target.const_data_ptr<tgt_t>()),
        scale(in.scale.const_data_ptr<acc_t>()),
        weight(in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr),
        c(in.c.defined() ? in.c.const_data_ptr<acc_t>() : nullptr) {}

  template <typename Penalty>
  Penalty penalty(int64_t b) const {
    return Penalty::make(config.penalty_param, c != nullptr ? static_cast<double>(c[b]) : 0.0);
  }
  template <typename Penalty>
  double chunk_sum(const Penalty& e, int64_t b, int64_t k) const {
    return chunk_penalty_sum<acc_t>(e, x + b * D, y + b * D, k * kChunk, std::min(D, (k + 1) * kChunk));
  }
  // The sample's gradient coefficient for the upstream gradient g_b and its influence w_b (both as stored
  // in acc_t, so the fused and the two-pass gradients are bitwise the same).
  acc_t coefficient(int64_t b, acc_t g_b, acc_t w_b) const {
    return static_cast<acc_t>(math::sample_grad_coefficient(g_b, weight != nullptr ? static_cast<double>(weight[b]) : 1.0,
                                                            w_b, scale[b], D, config.mean_over_elements));
  }
  // prefetch_next: also prefetch the same chunk of sample b + 1 (the one-pass kernel's next sample).
  template <typename Penalty>
  void chunk_grad(const Penalty& e, acc_t coef, in_t* out, int64_t b, int64_t k, bool prefetch_next,
                  bool stream) const {
    const int64_t offset = b * D;
    write_chunk_grad<acc_t>(e, coef, x + offset, y + offset, out + offset, k * kChunk, std::min(D, (k + 1) * kChunk),
                            prefetch_next && b + 1 < B ? D : 0, stream);
  }

  // Whether the gradient is streamed past the caches (stream2): where input, target and gradient together
  // exceed the last-level cache.
  bool streams_gradient() const {
    return B * D * static_cast<int64_t>(2 * sizeof(in_t) + sizeof(tgt_t)) > last_level_cache_bytes();
  }

  const LossConfig& config;
  const int64_t B, D, chunks;
  const in_t* x;
  const tgt_t* y;
  const acc_t *scale, *weight, *c;
};

// The forward, and with grad_input the gradient of the same call for an upstream gradient of 1 (ones for
// reduction "none") in the same pass: each sample's data is read from memory once, summed, and read again
// from cache to write its gradient once the sample's coefficient is known (3N moved instead of the 5N of a
// forward and a backward; docs/DESIGN.md, Kernels). Every sum has the order of the forward alone and the
// gradient is the backward kernel's, so both are bitwise what the two passes give.
template <typename Penalty, typename acc_t, typename in_t, typename tgt_t>
void forward_kernel(const LossConfig& config, const LossInputs& in, at::Tensor& loss, at::Tensor& penalty,
                    at::Tensor& influence, at::Tensor* grad_input) {
  const KernelArgs<acc_t, in_t, tgt_t> a(config, in);
  const int64_t B = a.B, chunks = a.chunks;
  acc_t* penalty_out = penalty.mutable_data_ptr<acc_t>();
  acc_t* influence_out = influence.mutable_data_ptr<acc_t>();
  in_t* grad_out = grad_input != nullptr ? grad_input->mutable_data_ptr<in_t>() : nullptr;
  // The upstream gradient of each sample's loss when the loss's own gradient is 1: 1 / B under "mean",
  // computed in acc_t as per_sample_grad computes it for the backward.
  const acc_t unit_grad = config.reduction == Reduction::Mean ? acc_t(1) / static_cast<acc_t>(B) : acc_t(1);

  std::vector<double> sample_loss(B);
  const bool stream = a.streams_gradient();
  // phi, w and the loss of sample b from its penalty sum; returns its gradient coefficient.
  const auto finish = [&](int64_t b, double sum) {
    const math::SampleForward s = math::sample_forward(config.transform, config.transform_param, sum, a.D,
                                                       config.mean_over_elements, a.scale[b],
                                                       a.weight != nullptr ? static_cast<double>(a.weight[b]) : 1.0);
    penalty_out[b] = static_cast<acc_t>(s.penalty);
    influence_out[b] = static_cast<acc_t>(s.influence);
    sample_loss[b] = s.loss;
    return a.coefficient(b, unit_grad, influence_out[b]);
  };

  if (chunks == 1) {  // samples are the tasks: sum, finish and (fused) write each one while it is in cache
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Penalty e = a.template penalty<Penalty>(b);
        const acc_t coef = finish(b, a.chunk_sum(e, b, 0));
        if (grad_out != nullptr) a.chunk_grad(e, coef, grad_out, b, 0, /*prefetch_next=*/b + 1 < end, stream);
      }
    });
  } else if (grad_out == nullptr) {  // chunks of every sample are the tasks
    std::vector<double> partial(B * chunks);
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks;
        partial[task] = a.chunk_sum(a.template penalty<Penalty>(b), b, task % chunks);
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum += partial[b * chunks + k];
      finish(b, sum);
    }
  } else {  // fused, large samples: one sample at a time, its chunks shared by the threads in both passes
    std::vector<double> partial(chunks);
    for (int64_t b = 0; b < B; ++b) {
      const Penalty e = a.template penalty<Penalty>(b);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) partial[k] = a.chunk_sum(e, b, k);
      });
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum += partial[k];
      const acc_t coef = finish(b, sum);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) a.chunk_grad(e, coef, grad_out, b, k, /*prefetch_next=*/false, stream);
      });
    }
  }

  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  if (config.reduction == Reduction::None) {
    for (int64_t b = 0; b < B; ++b) loss_out[b] = static_cast<acc_t>(sample_loss[b]);
  } else {
    double total = 0.0;
    for (int64_t b = 0; b < B; ++b) total += sample_loss[b];
    loss_out[0] = static_cast<acc_t>(config.reduction == Reduction::Mean ? total / static_cast<double>(B) : total);
  }
}

template <typename Penalty, typename acc_t, typename in_t, typename tgt_t>
void backward_kernel(const LossConfig& config, const LossInputs& in, const at::Tensor& grad_per_sample,
                     const at::Tensor& influence, at::Tensor& grad_input) {
  const KernelArgs<acc_t, in_t, tgt_t> a(config, in);
  const int64_t chunks = a.chunks;
  in_t* out = grad_input.mutable_data_ptr<in_t>();
  const acc_t* g = grad_per_sample.const_data_ptr<acc_t>();
  const acc_t* w = influence.const_data_ptr<acc_t>();
  const bool stream = a.streams_gradient();
  at::parallel_for(0, a.B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      a.chunk_grad(a.template penalty<Penalty>(b), a.coefficient(b, g[b], w[b]), out, b, task % chunks,
                   /*prefetch_next=*/false, stream);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const LossConfig& config, const LossInputs& in) {
  auto [loss, penalty, influence] = allocate_outputs(config, in);
  dispatch_loss_kernel(config, in, [&]<typename Penalty, typename acc_t, typename in_t, typename tgt_t>() {
    forward_kernel<Penalty, acc_t, in_t, tgt_t>(config, in, loss, penalty, influence, nullptr);
  });
  return {loss, penalty, influence};
}

LossOutputsWithGrad loss_forward_with_grad(const LossConfig& config, const LossInputs& in) {
  auto [loss, penalty, influence] = allocate_outputs(config, in);
  at::Tensor grad_input = at::empty_like(in.input, at::MemoryFormat::Contiguous);
  dispatch_loss_kernel(config, in, [&]<typename Penalty, typename acc_t, typename in_t, typename tgt_t>() {
    forward_kernel<Penalty, acc_t, in_t, tgt_t>(config, in, loss, penalty, influence, &grad_input);
  });
  return {loss, penalty, influence, grad_input};
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
