// Autograd for every loss operator (the torchvision pattern): the Function's forward re-dispatches to
// the operator below autograd, its backward calls the registered <loss>_backward operator, so
// torch.compile and torch.export trace both as opaque operators. The backward operator's own autograd
// kernel refuses double backward with a clear error instead of silently returning zero.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "../robust_diffusion.h"

namespace robust_diffusion {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Loss parameters travel to the backward in ctx->saved_data as IValues.
inline c10::IValue to_ivalue(double value) { return value; }
inline c10::IValue to_ivalue(c10::string_view value) { return std::string(value); }
inline c10::IValue to_ivalue(const at::Tensor& value) { return value; }

template <class T>
struct FromIValue;
template <>
struct FromIValue<double> {
  static double get(const c10::IValue& v) { return v.toDouble(); }
};
template <>
struct FromIValue<c10::string_view> {
  static c10::string_view get(const c10::IValue& v) { return v.toStringView(); }
};
template <>
struct FromIValue<const at::Tensor&> {
  static const at::Tensor& get(const c10::IValue& v) { return v.toTensor(); }
};

inline std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

template <class Loss, class Params = LossParams<Loss>>
struct LossFunction;

template <class Loss, class... P>
struct LossFunction<Loss, c10::guts::typelist::typelist<P...>>
    : public torch::autograd::Function<LossFunction<Loss, c10::guts::typelist::typelist<P...>>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                               c10::string_view dim_reduction, c10::string_view reduction, P... params) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, penalty, influence] =
        LossOperator<Loss>::forward().call(input, target, scale, weight, dim_reduction, reduction, params...);
    ctx->save_for_backward({input, target, scale, weight.value_or(at::Tensor()), influence});
    ctx->saved_data["dim_reduction"] = std::string(dim_reduction);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["params"] = c10::ivalue::Tuple::create(std::vector<c10::IValue>{to_ivalue(params)...});
    ctx->mark_non_differentiable({penalty, influence});
    return {loss, penalty, influence};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(6 + sizeof...(P));  // one per forward argument; only input and target get one
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    if (!grad_outputs[0].defined() || !(need_input || need_target)) return grads;
    const auto saved = ctx->get_saved_variables();
    const auto params = ctx->saved_data["params"].toTuple();
    const at::Tensor grad = call_backward(ctx, grad_outputs[0], saved, params->elements(),
                                          std::index_sequence_for<P...>{});
    if (need_input) grads[0] = grad;
    if (need_target) grads[1] = grad.neg().to(saved[1].scalar_type());  // d r / d target = -1
    return grads;
  }

  template <size_t... I>
  static at::Tensor call_backward(AutogradContext* ctx, const at::Tensor& grad_loss, const variable_list& saved,
                                  c10::ArrayRef<c10::IValue> params, std::index_sequence<I...>) {
    return LossOperator<Loss>::backward().call(grad_loss, saved[0], saved[1], saved[2], optional_tensor(saved[3]),
                                               saved[4], ctx->saved_data["dim_reduction"].toStringView(),
                                               ctx->saved_data["reduction"].toStringView(),
                                               FromIValue<P>::get(params[I])...);
  }

  // The autograd kernel of the forward operator.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_op(
      const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
      const std::optional<at::Tensor>& weight, c10::string_view dim_reduction, c10::string_view reduction,
      P... params) {
    auto out = LossFunction::apply(input, target, scale, weight, dim_reduction, reduction, params...);
    return {out[0], out[1], out[2]};
  }
};

// Autograd kernel of <loss>_backward: computes it, and raises if anything differentiates through it.
template <class Loss, class Params = LossParams<Loss>>
struct LossBackwardFunction;

template <class Loss, class... P>
struct LossBackwardFunction<Loss, c10::guts::typelist::typelist<P...>>
    : public torch::autograd::Function<LossBackwardFunction<Loss, c10::guts::typelist::typelist<P...>>> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_loss, const at::Tensor& input,
                               const at::Tensor& target, const at::Tensor& scale,
                               const std::optional<at::Tensor>& weight, const at::Tensor& influence,
                               c10::string_view dim_reduction, c10::string_view reduction, P... params) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {LossOperator<Loss>::backward().call(grad_loss, input, target, scale, weight, influence, dim_reduction,
                                                reduction, params...)};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false, "robust_diffusion::", Loss::name,
                ": double backward (differentiating the gradient) is not supported");
    return {};
  }

  static at::Tensor apply_op(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                             const at::Tensor& influence, c10::string_view dim_reduction, c10::string_view reduction,
                             P... params) {
    return LossBackwardFunction::apply(grad_loss, input, target, scale, weight, influence, dim_reduction, reduction,
                                       params...)[0];
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_diffusion, Autograd, m) {
  losses::for_each_loss([&](auto loss) {
    using Loss = decltype(loss);
    m.impl(Loss::name, &LossFunction<Loss>::apply_op);
    m.impl((std::string(Loss::name) + "_backward").c_str(), &LossBackwardFunction<Loss>::apply_op);
  });
}

}  // namespace robust_diffusion
