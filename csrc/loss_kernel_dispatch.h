// Picks the kernel instantiation for a call: the penalty functor, the compute type and the two
// storage types. Shared by the CPU and CUDA backends so both accept exactly the same inputs.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "loss_config.h"

namespace robust_diffusion {

template <template <class> class P>
struct PenaltyTag {
  template <class T>
  using type = P<T>;
};

// Calls f.template operator()<Penalty, acc_t, in_t, tgt_t>() where acc_t is the compute type
// (float, or double for float64), in_t / tgt_t the storage types of input and target.
template <typename F>
void dispatch_loss_kernel(const LossConfig& config, const LossInputs& in, F&& f) {
  const auto run = [&](auto penalty_tag) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "robust_diffusion_loss", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using Penalty = typename decltype(penalty_tag)::template type<acc_t>;
      if (in.target.scalar_type() == in.input.scalar_type()) {
        f.template operator()<Penalty, acc_t, scalar_t, scalar_t>();
      } else {  // float16/bfloat16 input with a float32 target: the one mix prepare_inputs keeps
        TORCH_INTERNAL_ASSERT(in.target.scalar_type() == at::kFloat);
        if constexpr (!std::is_same_v<scalar_t, double>) f.template operator()<Penalty, acc_t, scalar_t, float>();
      }
    });
  };
  switch (config.penalty) {
    case math::PenaltyKind::Square:
      return run(PenaltyTag<math::SquarePenalty>{});
    case math::PenaltyKind::Huber:
      return run(PenaltyTag<math::HuberPenalty>{});
    case math::PenaltyKind::PseudoHuber:
      return run(PenaltyTag<math::PseudoHuberPenalty>{});
    case math::PenaltyKind::ClampedSquare:
      return run(PenaltyTag<math::ClampedSquarePenalty>{});
  }
}

}  // namespace robust_diffusion
