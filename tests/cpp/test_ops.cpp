// The operators as a LibTorch program sees them: found in the dispatcher, called through it (boxed, as
// TorchScript calls them, and typed), differentiated by autograd, and checked against references
// written with plain LibTorch ops in float64. The Python tests cover every loss and dtype in depth.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "math/tabulated_divergences.h"
#include "robust_diffusion.h"

namespace {

using at::Tensor;
using Catch::Matchers::Contains;
namespace rdm = robust_diffusion::math;

// Every loss operator's name, from the list that registers them (losses.h).
const std::vector<std::string> kLosses = [] {
  std::vector<std::string> names;
  robust_diffusion::losses::for_each_loss([&](auto loss) { names.emplace_back(decltype(loss)::name); });
  return names;
}();

c10::OperatorHandle find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("robust_diffusion::" + name).c_str(), "");
}

// Calls robust_diffusion::<name> through the boxed dispatcher (what TorchScript does); returns its outputs.
std::vector<c10::IValue> call_boxed(const std::string& name, std::vector<c10::IValue> stack) {
  find_op(name).callBoxed(&stack);
  return stack;
}

// The arguments every loss takes, then the loss's own.
std::vector<c10::IValue> loss_args(const Tensor& input, const Tensor& target, const Tensor& scale,
                                   const std::optional<Tensor>& weight, const std::string& dim_reduction,
                                   const std::string& reduction, const std::vector<c10::IValue>& params = {}) {
  std::vector<c10::IValue> args{input, target, scale, weight, dim_reduction, reduction};
  args.insert(args.end(), params.begin(), params.end());
  return args;
}

Tensor reduce_samples(const Tensor& per_sample, const std::string& reduction) {
  if (reduction == "mean") return per_sample.mean();
  if (reduction == "sum") return per_sample.sum();
  return per_sample;
}

// One loss as a reference: its elementwise penalty e(r) and per-sample transform phi(delta); for the tabulated
// divergences also its influence weight w(delta) = phi'(delta), checked against the operator's influence output.
struct LossCase {
  std::string name;
  std::vector<c10::IValue> params;
  std::function<Tensor(const Tensor& r)> penalty;
  std::function<Tensor(const Tensor& delta)> phi;
  std::function<Tensor(const Tensor& delta)> w = nullptr;
};

// NED, JS and Le Cam have no closed form: their reference is the torch-free math header (csrc/math), evaluated
// per sample on the host.
using TabulatedPhiW = void (*)(double, double*, double*);

std::pair<Tensor, Tensor> tabulated_phi_w(TabulatedPhiW phi_w, const Tensor& delta) {
  const Tensor d = delta.detach().to(at::kDouble).contiguous();
  Tensor phi = at::empty_like(d), w = at::empty_like(d);
  for (int64_t b = 0; b < d.numel(); ++b)
    phi_w(d.data_ptr<double>()[b], phi.data_ptr<double>() + b, w.data_ptr<double>() + b);
  return {phi, w};
}

// phi(delta) with derivative w(delta) for autograd: the value phi, plus w (delta - delta) that only differentiates.
std::function<Tensor(const Tensor&)> tabulated_phi(TabulatedPhiW phi_w) {
  return [phi_w](const Tensor& delta) {
    const auto [phi, w] = tabulated_phi_w(phi_w, delta);
    return phi + w * (delta - delta.detach());
  };
}

std::function<Tensor(const Tensor&)> tabulated_w(TabulatedPhiW phi_w) {
  return [phi_w](const Tensor& delta) { return tabulated_phi_w(phi_w, delta).second; };
}

// pseudo_huber_loss's c, one per sample of the default batch of 3.
Tensor pseudo_huber_c() { return at::tensor({0.3, 0.05, 0.8}, at::kDouble); }

std::vector<LossCase> loss_cases() {
  const auto square = [](const Tensor& r) { return r * r; };
  const auto identity = [](const Tensor& delta) { return delta; };
  const auto alpha_phi = [](double kappa) {
    return [kappa](const Tensor& delta) { return -at::expm1(-kappa * delta) / kappa; };
  };
  return {
      {"kl_loss", {}, square, identity},
      {"hellinger_loss", {}, square, alpha_phi(0.25)},
      {"alpha_loss", {0.3}, square, alpha_phi(0.3 * 0.7)},
      {"ned_loss", {}, square, tabulated_phi(rdm::ned_phi_w), tabulated_w(rdm::ned_phi_w)},
      {"js_loss", {}, square, tabulated_phi(rdm::js_phi_w), tabulated_w(rdm::js_phi_w)},
      {"lecam_loss", {}, square, tabulated_phi(rdm::lecam_phi_w), tabulated_w(rdm::lecam_phi_w)},
      {"tv_loss", {}, square, [](const Tensor& d) { return at::erf(at::sqrt(d) / 2); }},
      {"chi2_loss", {}, square, [](const Tensor& d) { return at::expm1(2 * d) / 2; }},
      {"huber_loss",
       {0.7},
       [](const Tensor& r) { return at::where(r.abs() <= 0.7, 0.5 * r * r, 0.7 * (r.abs() - 0.35)); },
       identity},
      {"pseudo_huber_loss",
       {pseudo_huber_c(), "huber"},
       [](const Tensor& r) {
         const Tensor c = pseudo_huber_c().view({-1, 1, 1, 1});
         return 2 * c * (at::sqrt(r * r + c * c) - c);
       },
       identity},
      {"clipped_mse_loss", {0.5, "element"}, [](const Tensor& r) { return r.clamp(-0.5, 0.5).square(); }, identity},
      {"clipped_mse_loss", {1.0, "sample"}, square, [](const Tensor& d) { return d.clamp_max(1.0); }},
  };
}

// weight_b * phi(scale_b * R_b), R_b = the sum or mean of e(r) over sample b, then the batch reduction.
Tensor reference_loss(const LossCase& loss, const Tensor& input, const Tensor& target, const Tensor& scale,
                      const std::optional<Tensor>& weight, const std::string& dim_reduction,
                      const std::string& reduction) {
  const Tensor e = loss.penalty(input - target).flatten(1);
  const Tensor penalty = dim_reduction == "mean" ? e.mean(1) : e.sum(1);
  Tensor per_sample = loss.phi(scale * penalty);
  if (weight) per_sample = per_sample * *weight;
  return reduce_samples(per_sample, reduction);
}

// A loss's own parameters, for the failure report.
std::string describe(const std::vector<c10::IValue>& params) {
  std::ostringstream out;
  for (const auto& p : params)
    out << (p.isTensor() ? "<tensor>" : p.isString() ? p.toStringRef() : std::to_string(p.toDouble())) << " ";
  return out.str();
}

// allclose, and on failure the shapes or the largest difference in the test's report.
bool close(const Tensor& actual, const Tensor& expected, double rtol = 1e-9, double atol = 1e-12) {
  if (actual.sizes() != expected.sizes()) {
    UNSCOPED_INFO("shape " << actual.sizes() << ", expected " << expected.sizes());
    return false;
  }
  if (at::allclose(actual, expected, rtol, atol)) return true;
  UNSCOPED_INFO("max |actual - expected| = " << (actual - expected).abs().max().item<double>());
  return false;
}

struct Inputs {
  Tensor input, target, scale, weight;
};

// Batch 3 of odd-sized samples; residuals of size ~1 so every branch (Huber, clamps) is exercised.
Inputs random_inputs(at::IntArrayRef shape = {3, 2, 5, 7}, at::ScalarType dtype = at::kDouble) {
  const auto options = at::TensorOptions().dtype(dtype);
  return {at::randn(shape, options), at::randn(shape, options), at::rand({shape[0]}, options) * 0.5 + 0.1,
          at::rand({shape[0]}, options) + 0.5};
}

}  // namespace

TEST_CASE("every loss operator and its backward are registered with CPU and Autograd kernels", "[registry]") {
  for (const auto& loss : kLosses) {
    for (const auto& name : {loss, loss + "_backward"}) {
      INFO("robust_diffusion::" << name);
      const auto op = c10::Dispatcher::singleton().findSchema({"robust_diffusion::" + name, ""});
      REQUIRE(op.has_value());
      CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CPU));
      CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::Autograd));
#ifdef RD_WITH_CUDA
      CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA));
#endif
    }
    const auto& returns = find_op(loss).schema().returns();
    REQUIRE(returns.size() == 3);
    CHECK(returns[0].name() == "loss");
    CHECK(returns[1].name() == "penalty");
    CHECK(returns[2].name() == "influence");
  }
}

TEST_CASE("forward and backward match LibTorch references", "[ops]") {
  const std::string dim_reduction = GENERATE(as<std::string>{}, "mean", "sum");
  const std::string reduction = GENERATE(as<std::string>{}, "mean", "sum", "none");
  const bool weighted = GENERATE(false, true);
  at::manual_seed(0);

  for (const auto& loss : loss_cases()) {
    INFO(loss.name << "(" << describe(loss.params) << ") dim_reduction=" << dim_reduction << " reduction=" << reduction
                   << " weighted=" << weighted);
    Inputs in = random_inputs();
    if (dim_reduction == "sum") in.scale = in.scale / 70;  // keep delta = scale * R moderate
    const std::optional<Tensor> weight = weighted ? std::optional<Tensor>(in.weight) : std::nullopt;
    const Tensor input = in.input.clone().requires_grad_(), target = in.target.clone().requires_grad_();
    const Tensor ref_input = in.input.clone().requires_grad_(), ref_target = in.target.clone().requires_grad_();

    const auto outputs =
        call_boxed(loss.name, loss_args(input, target, in.scale, weight, dim_reduction, reduction, loss.params));
    const Tensor out = outputs[0].toTensor();
    const Tensor expected = reference_loss(loss, ref_input, ref_target, in.scale, weight, dim_reduction, reduction);
    REQUIRE(close(out, expected));

    const Tensor grad_out = at::randn_like(expected);
    (out * grad_out).sum().backward();
    (expected * grad_out).sum().backward();
    CHECK(close(input.grad(), ref_input.grad()));
    CHECK(close(target.grad(), ref_target.grad()));

    if (loss.w) {
      // The influence output is the header's w(scale_b R_b), and the gradient is w times the scaled MSE
      // gradient (docs/DESIGN.md, Losses): g_b weight_b w_b scale_b 2 r (/ D for dim_reduction = "mean").
      const Tensor r = (in.input - in.target).flatten(1);
      const int64_t batch = r.size(0), numel = r.size(1);
      const Tensor penalty = dim_reduction == "mean" ? r.square().mean(1) : r.square().sum(1);
      const Tensor w = loss.w(in.scale * penalty);
      CHECK(close(outputs[1].toTensor(), penalty));
      CHECK(close(outputs[2].toTensor(), w));
      CHECK(w.min().item<double>() < 0.99);  // the weights act: not every sample at w ~ 1
      Tensor g = reduction == "none" ? grad_out : grad_out.expand({batch}) / (reduction == "mean" ? batch : 1);
      Tensor coefficient = g * w * in.scale * (dim_reduction == "mean" ? 1.0 / numel : 1.0);
      if (weight) coefficient = coefficient * *weight;
      const Tensor grad = (coefficient.view({-1, 1}) * 2 * r).view_as(in.input);
      CHECK(close(input.grad(), grad));
      CHECK(close(target.grad(), -grad));
    }
  }
}

TEST_CASE("ned_loss, js_loss and lecam_loss reproduce DESIGN's test vectors", "[ops]") {
  // One sample per delta with the single non-zero residual sqrt(delta), scale 1, dim_reduction = "sum": R = delta,
  // the per-sample loss is phi(delta) and the influence w(delta). docs/DESIGN.md, Divergences, as printed; Le Cam's w at
  // delta = 1 and 8 corrected by one unit in the last digit (see test_divergence_tables.cpp).
  struct Vector {
    const char* name;
    double delta, phi, w;
  };
  const Vector vectors[] = {
      {"ned_loss", 0.5, 0.392925, 0.621273},    {"ned_loss", 1, 0.654038, 0.441514},
      {"ned_loss", 2, 0.994903, 0.263583},      {"ned_loss", 8, 1.61095, 0.0316206},
      {"ned_loss", 32, 1.71813, 4.00098e-5},    {"js_loss", 0.5, 0.445686, 0.795946},
      {"js_loss", 1, 0.805382, 0.649887},       {"js_loss", 2, 1.34732, 0.449600},
      {"js_loss", 8, 2.53088, 0.0685974},       {"js_loss", 32, 2.77221, 9.82187e-5},
      {"lecam_loss", 0.5, 0.408109, 0.676392},  {"lecam_loss", 1, 0.700227, 0.506055},
      {"lecam_loss", 2, 1.100801, 0.316555},    {"lecam_loss", 8, 1.862805, 0.0401664},
  };
  for (const auto& v : vectors) {
    INFO(v.name << " delta = " << v.delta);
    const Tensor input = at::zeros({1, 3}, at::kDouble);
    input[0][0].fill_(std::sqrt(v.delta));
    const auto out = call_boxed(v.name, loss_args(input, at::zeros_like(input), at::ones({1}, at::kDouble),
                                                  std::nullopt, "sum", "none"));
    const double phi = out[0].toTensor().item<double>(), w = out[2].toTensor().item<double>();
    // Six or seven printed digits: half a unit in the last place is at most 4e-6 relative.
    CHECK(std::fabs(phi - v.phi) <= 4e-6 * v.phi);
    CHECK(std::fabs(w - v.w) <= 4e-6 * v.w);
  }
}

TEST_CASE("huber_loss and kl_loss at unit scale are torch's huber_loss and mse_loss", "[ops]") {
  at::manual_seed(1);
  const Inputs in = random_inputs({4, 3, 9});
  const Tensor ones = at::ones({4}, at::kDouble);
  const Tensor huber =
      call_boxed("huber_loss", loss_args(in.input, in.target, ones, std::nullopt, "mean", "mean", {0.5}))[0].toTensor();
  CHECK(close(huber, at::huber_loss(in.input, in.target, at::Reduction::Mean, 0.5)));
  const Tensor kl =
      call_boxed("kl_loss", loss_args(in.input, in.target, ones, std::nullopt, "mean", "sum"))[0].toTensor();
  CHECK(close(kl, at::mse_loss(in.input, in.target, at::Reduction::Mean) * 4));
}

TEST_CASE("hellinger_loss through the typed C++ API returns the per-sample penalty and influence", "[ops]") {
  namespace rd = robust_diffusion;
  at::manual_seed(2);
  const Inputs in = random_inputs();
  const auto [loss, penalty, influence] = rd::loss<rd::losses::Hellinger>(in.input, in.target, in.scale, in.weight,
                                                                          "mean", "none");
  // A loss with its own parameter: alpha = 1/2 is Hellinger.
  const auto alpha = rd::loss<rd::losses::Alpha>(in.input, in.target, in.scale, in.weight, "mean", "none", 0.5);
  CHECK(close(std::get<0>(alpha), loss));

  const Tensor mse = (in.input - in.target).square().flatten(1).mean(1);
  CHECK(close(penalty, mse));
  CHECK(close(influence, at::exp(-in.scale * mse / 4)));
  CHECK(close(loss, in.weight * 4 * (1 - at::exp(-in.scale * mse / 4))));
}

TEST_CASE("float32 inputs, non-contiguous inputs and multi-chunk samples", "[ops]") {
  at::manual_seed(3);
  const Inputs in = random_inputs({2, 3, 70, 90}, at::kFloat);  // 18900 elements per sample: two CPU chunks
  const auto hellinger = [&](const Tensor& input, const Tensor& target) {
    return call_boxed("hellinger_loss", loss_args(input, target, in.scale, in.weight, "mean", "none"))[0].toTensor();
  };
  const Tensor loss = hellinger(in.input, in.target);
  CHECK(loss.scalar_type() == at::kFloat);
  const Tensor mse = (in.input.to(at::kDouble) - in.target.to(at::kDouble)).square().flatten(1).mean(1);
  const Tensor expected = in.weight.to(at::kDouble) * 4 * (1 - at::exp(-in.scale.to(at::kDouble) * mse / 4));
  CHECK(close(loss.to(at::kDouble), expected, 1e-5, 1e-6));

  const Tensor transposed_input = in.input.transpose(2, 3).contiguous().transpose(2, 3);
  REQUIRE_FALSE(transposed_input.is_contiguous());
  CHECK(at::equal(hellinger(transposed_input, in.target), loss));
  CHECK(at::equal(hellinger(in.input, in.target), loss));  // bitwise deterministic
}

TEST_CASE("bad arguments raise a c10::Error that names the argument", "[errors]") {
  const Inputs in = random_inputs();
  const auto call = [&](const std::string& name, const std::vector<c10::IValue>& args) { call_boxed(name, args); };

  CHECK_THROWS_AS(
      call("hellinger_loss", loss_args(in.input, in.target, at::ones({2}, at::kDouble), std::nullopt, "mean", "mean")),
      c10::Error);
  CHECK_THROWS_WITH(
      call("hellinger_loss", loss_args(in.input, in.target, at::ones({2}, at::kDouble), std::nullopt, "mean", "mean")),
      Contains("hellinger_loss: scale must have one value per sample"));
  CHECK_THROWS_WITH(
      call("kl_loss", loss_args(in.input, in.target, in.scale, at::ones({4}, at::kDouble), "mean", "mean")),
      Contains("kl_loss: weight must have one value per sample"));
  CHECK_THROWS_WITH(call("kl_loss", loss_args(in.input, in.target.flatten(1), in.scale, std::nullopt, "mean", "mean")),
                    Contains("kl_loss: target must have the shape of input"));
  CHECK_THROWS_WITH(call("kl_loss", loss_args(in.input, in.target, in.scale, std::nullopt, "mean", "avg")),
                    Contains("kl_loss: reduction must be 'mean', 'sum' or 'none'"));
  CHECK_THROWS_WITH(call("kl_loss", loss_args(in.input, in.target, in.scale, std::nullopt, "max", "mean")),
                    Contains("kl_loss: dim_reduction must be 'sum' or 'mean'"));
  CHECK_THROWS_WITH(call("kl_loss", loss_args(in.input, in.target, -in.scale, std::nullopt, "mean", "mean")),
                    Contains("kl_loss: scale must be non-negative"));
  CHECK_THROWS_WITH(call("alpha_loss", loss_args(in.input, in.target, in.scale, std::nullopt, "mean", "mean", {1.5})),
                    Contains("alpha_loss: alpha must lie in the open interval (0, 1)"));
  CHECK_THROWS_WITH(call("pseudo_huber_loss", loss_args(in.input, in.target, in.scale, std::nullopt, "mean", "mean",
                                                        {pseudo_huber_c(), "l1"})),
                    Contains("pseudo_huber_loss: form must be 'huber' or 'smooth_l1'"));
  CHECK_THROWS_WITH(call("kl_loss", loss_args(in.input.slice(0, 0, 0), in.target.slice(0, 0, 0),
                                              in.scale.slice(0, 0, 0), std::nullopt, "mean", "mean")),
                    Contains("kl_loss: input has an empty batch"));
}

TEST_CASE("double backward raises a clear error", "[errors]") {
  const Inputs in = random_inputs();
  const Tensor input = in.input.clone().requires_grad_();
  const Tensor loss =
      call_boxed("hellinger_loss", loss_args(input, in.target, in.scale, std::nullopt, "mean", "mean"))[0].toTensor();
  const Tensor grad = torch::autograd::grad({loss}, {input}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  CHECK_THROWS_WITH(grad.sum().backward(), Contains("double backward"));
}

TEST_CASE("risk_noising adds only the missing noise and is the standard noising at zero risk", "[risk]") {
  const auto op = find_op("risk_noising");
  CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::CPU));
  CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::Autograd));
  at::manual_seed(4);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const Tensor sample = at::randn({3, 2, 5}, options), noise = at::randn({3, 2, 5}, options);
  const Tensor alpha = at::tensor({0.9, 0.6, 0.3}, options), sigma = at::sqrt(1 - alpha * alpha);
  const Tensor a = alpha.view({-1, 1, 1}), s = sigma.view({-1, 1, 1});
  const auto call = [&](const Tensor& risk, const std::string& prediction_type) {
    return call_boxed("risk_noising", {sample, risk, noise, alpha, sigma, prediction_type, "gaussian"});
  };

  // Per-element risk inside every sample's stability interval (alpha r < sigma).
  const Tensor risk = at::rand({3, 2, 5}, options) * 0.3;
  const Tensor v = at::sqrt(s * s - a * a * risk * risk);  // x_t = alpha x~ + v eta has the clean variance
  const auto eps = call(risk, "epsilon");
  CHECK(close(eps[0].toTensor(), a * sample + v * noise));
  CHECK(close(eps[1].toTensor(), s / v * noise));
  CHECK(close(eps[2].toTensor(), v));
  CHECK(close(call(risk, "sample")[1].toTensor(), sample - a * risk * risk / v * noise));

  // The typed C++ API calls the same operator.
  const auto typed = robust_diffusion::risk_noising(sample, risk, noise, alpha, sigma, "epsilon", "gaussian");
  CHECK(at::equal(std::get<0>(typed), eps[0].toTensor()));

  // Zero risk: the clean process and its targets, bit for bit.
  const auto clean = call(at::zeros({3}, options), "epsilon");
  CHECK(at::equal(clean[0].toTensor(), a * sample + s * noise));
  CHECK(at::equal(clean[1].toTensor(), noise));

  // A negative risk is an error that names the argument.
  CHECK_THROWS_WITH(call(at::full({3}, -0.1, options), "epsilon"), Contains("risk"));
}
