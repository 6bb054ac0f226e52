// Elementwise penalties e(r; c) and their derivatives e'(r; c) (docs/DESIGN.md, Losses and Baselines).
//
// Torch-free and written once for every backend: each functor is templated on the value type V,
// which is a scalar (float/double) on CUDA and in CPU tails, or a SIMD vector on the CPU. The few
// operations that differ between those types go through VecOps<V>: the scalar specialisations live
// here, the SIMD one in the CPU kernel file.
#pragma once

#include <cmath>

#include "host_device.h"

namespace robust_diffusion {
namespace math {

template <typename V>
struct VecOps;  // abs, min, max, sqrt, where_abs_less(r, bound, x) = |r| < bound ? x : 0

template <typename S>
struct ScalarOps {
  RD_HOST_DEVICE static S abs(S x) { return std::fabs(x); }
  // NaN-propagating, as at::vec::minimum / maximum (the SIMD path) and torch.minimum / maximum are.
  RD_HOST_DEVICE static S min(S a, S b) { return (a < b || a != a) ? a : b; }
  RD_HOST_DEVICE static S max(S a, S b) { return (a > b || a != a) ? a : b; }
  RD_HOST_DEVICE static S sqrt(S x) { return std::sqrt(x); }
  RD_HOST_DEVICE static S where_abs_less(S r, S bound, S x) { return std::fabs(r) < bound ? x : S(0); }
};
template <>
struct VecOps<float> : ScalarOps<float> {};
template <>
struct VecOps<double> : ScalarOps<double> {};

// Which penalty a loss uses; the kernels are instantiated once per penalty. Each functor is templated
// on the compute type T (float, or double for float64 inputs) that holds its parameters.
enum class PenaltyKind : int { Square = 0, Huber = 1, PseudoHuber = 2, ClampedSquare = 3 };

// e(r) = r^2: the divergence family (KL = MSE and every f-divergence transform of it).
template <typename T>
struct SquarePenalty {
  RD_HOST_DEVICE static SquarePenalty make(double /*param*/, double /*c*/) { return {}; }
  template <typename V>
  RD_HOST_DEVICE V value(V r) const { return r * r; }
  template <typename V>
  RD_HOST_DEVICE V grad(V r) const { return r + r; }
};

// PyTorch's Huber: 0.5 r^2 for |r| <= d, else d (|r| - 0.5 d). With a = min(|r|, d) both branches are
// a (|r| - a / 2), which keeps the SIMD path branch-free.
template <typename T>
struct HuberPenalty {
  T d;
  RD_HOST_DEVICE static HuberPenalty make(double delta, double /*c*/) { return {static_cast<T>(delta)}; }
  template <typename V>
  RD_HOST_DEVICE V value(V r) const {
    using Op = VecOps<V>;
    const V abs_r = Op::abs(r);
    const V a = Op::min(abs_r, V(d));
    return a * (abs_r - V(T(0.5)) * a);
  }
  template <typename V>
  RD_HOST_DEVICE V grad(V r) const {
    using Op = VecOps<V>;
    return Op::max(Op::min(r, V(d)), V(-d));
  }
};

// diffusers' pseudo-Huber, scale * (sqrt(r^2 + c^2) - c): scale = 2c for loss_type "huber" and 2 for
// "smooth_l1". c is per sample (it follows the timestep schedule), so the functor is built per sample.
template <typename T>
struct PseudoHuberPenalty {
  T c, scale;
  // param: 1 selects the "huber" form (scale 2c), 0 the "smooth_l1" form (scale 2).
  RD_HOST_DEVICE static PseudoHuberPenalty make(double huber_form, double c) {
    return {static_cast<T>(c), static_cast<T>(huber_form != 0.0 ? 2.0 * c : 2.0)};
  }
  template <typename V>
  RD_HOST_DEVICE V value(V r) const {
    using Op = VecOps<V>;
    return V(scale) * (Op::sqrt(r * r + V(c * c)) - V(c));
  }
  template <typename V>
  RD_HOST_DEVICE V grad(V r) const {
    using Op = VecOps<V>;
    return V(scale) * r / Op::sqrt(r * r + V(c * c));
  }
};

// Per-element clamp of the residual to [-tau, tau] before squaring: zero gradient outside.
template <typename T>
struct ClampedSquarePenalty {
  T tau;
  RD_HOST_DEVICE static ClampedSquarePenalty make(double tau, double /*c*/) { return {static_cast<T>(tau)}; }
  template <typename V>
  RD_HOST_DEVICE V value(V r) const {
    using Op = VecOps<V>;
    const V a = Op::min(Op::abs(r), V(tau));
    return a * a;
  }
  template <typename V>
  RD_HOST_DEVICE V grad(V r) const {
    using Op = VecOps<V>;
    return Op::where_abs_less(r, V(tau), r + r);
  }
};

}  // namespace math
}  // namespace robust_diffusion
