// The list of loss operators. Each entry gives the operator's name, the schema of its own arguments
// (after the ones every loss takes) and how those arguments make a LossConfig. Registration (loss_schema.cpp),
// the backends and autograd are all generated from this list: adding a loss is adding an entry.
#pragma once

#include <c10/util/Metaprogramming.h>

#include <cmath>
#include <string>

#include "loss_config.h"

namespace robust_diffusion {
namespace losses {

using math::PenaltyKind;
using math::TransformKind;

inline LossConfig divergence(const char* name, TransformKind transform, double param = 0.0) {
  LossConfig config;
  config.name = name;
  config.transform = transform;
  config.transform_param = param;
  return config;
}

struct KL {
  static constexpr const char* name = "kl_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::Identity); }
};
struct Hellinger {  // the alpha-divergence at alpha = 1/2: kappa = 1/4
  static constexpr const char* name = "hellinger_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::Alpha, 0.25); }
};
struct NED {
  static constexpr const char* name = "ned_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::NED); }
};
struct Alpha {
  static constexpr const char* name = "alpha_loss";
  static constexpr const char* params = ", float alpha";
  static LossConfig config(double alpha) {
    TORCH_CHECK_VALUE(alpha > 0.0 && alpha < 1.0, name, ": alpha must lie in the open interval (0, 1), got ", alpha);
    return divergence(name, TransformKind::Alpha, alpha * (1.0 - alpha));
  }
};
struct JS {
  static constexpr const char* name = "js_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::JS); }
};
struct LeCam {
  static constexpr const char* name = "lecam_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::LeCam); }
};
struct TV {
  static constexpr const char* name = "tv_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::TV); }
};
struct Chi2 {
  static constexpr const char* name = "chi2_loss";
  static constexpr const char* params = "";
  static LossConfig config() { return divergence(name, TransformKind::Chi2); }
};

struct Huber {
  static constexpr const char* name = "huber_loss";
  static constexpr const char* params = ", float delta";
  static LossConfig config(double delta) {
    TORCH_CHECK_VALUE(delta > 0.0 && std::isfinite(delta), name, ": delta must be positive and finite, got ", delta);
    LossConfig config = divergence(name, TransformKind::Identity);
    config.penalty = PenaltyKind::Huber;
    config.penalty_param = delta;
    return config;
  }
};
struct PseudoHuber {  // diffusers' loss_type "huber" (2c (sqrt(r^2 + c^2) - c)) or "smooth_l1" (2 (...))
  static constexpr const char* name = "pseudo_huber_loss";
  static constexpr const char* params = ", Tensor c, str form";
  static LossConfig config(const at::Tensor& c, c10::string_view form) {
    TORCH_CHECK_VALUE(form == "huber" || form == "smooth_l1", name,
                      ": form must be 'huber' or 'smooth_l1', got '", std::string(form), "'");
    LossConfig config = divergence(name, TransformKind::Identity);
    config.penalty = PenaltyKind::PseudoHuber;
    config.penalty_param = form == "huber" ? 1.0 : 0.0;
    config.c = c;
    return config;
  }
};
struct ClippedMSE {  // mode "sample": min(scale * R_b, tau); mode "element": r clamped to [-tau, tau]
  static constexpr const char* name = "clipped_mse_loss";
  static constexpr const char* params = ", float tau, str mode";
  static LossConfig config(double tau, c10::string_view mode) {
    TORCH_CHECK_VALUE(tau > 0.0, name, ": tau must be positive, got ", tau);
    TORCH_CHECK_VALUE(mode == "sample" || mode == "element", name,
                      ": mode must be 'sample' or 'element', got '", std::string(mode), "'");
    if (mode == "sample") return divergence(name, TransformKind::Clip, tau);
    LossConfig config = divergence(name, TransformKind::Identity);
    config.penalty = PenaltyKind::ClampedSquare;
    config.penalty_param = tau;
    return config;
  }
};

// Calls visit(Loss{}) for every loss (the registration loops).
template <class Visitor>
void for_each_loss(Visitor&& visit) {
  visit(KL{});
  visit(Hellinger{});
  visit(NED{});
  visit(Alpha{});
  visit(JS{});
  visit(LeCam{});
  visit(TV{});
  visit(Chi2{});
  visit(Huber{});
  visit(PseudoHuber{});
  visit(ClippedMSE{});
}

}  // namespace losses

// The parameter types of a loss's own arguments, from its Loss::config.
template <class Loss>
using LossParams = typename c10::guts::infer_function_traits_t<decltype(&Loss::config)>::parameter_types;

}  // namespace robust_diffusion
