// Autograd for every loss operator, written the way PyTorch's generated autograd kernels are: the kernel
// runs the operator below autograd and, when input or target requires grad, attaches a node that calls
// the registered <loss>_backward operator. A hand-written node (rather than torch::autograd::Function)
// gives grad_fn a readable name, HellingerLossBackward0 as PyTorch's own MseLossBackward0, and is
// traceable by compiled autograd; torch.compile and torch.export see both operators as opaque.
// scale and weight get no gradient, so a scale or weight that requires grad is refused (it would
// silently stay without one). Differentiating the gradient (double backward) is refused too.
//
// On the CPU in eager mode the forward computes the input's gradient in the same pass (<loss>_with_grad) and the
// node keeps it: a backward whose upstream gradient is 1 (loss.backward()) then moves no data at all, any other
// only scales it. Traced calls (torch.compile, torch.export, dispatch modes), CUDA, create_graph and compiled
// autograd keep the two-pass <loss>_backward. (docs/DESIGN.md, Kernels)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../diagnostics.h"
#include "../robust_diffusion.h"

namespace robust_diffusion {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// "pseudo_huber_loss" -> "PseudoHuberLoss": the operator's name as PyTorch spells its autograd nodes.
std::string camel_case(const char* snake) {
  std::string out;
  bool upper = true;
  for (const char* c = snake; *c; ++c) {
    if (*c == '_') {
      upper = true;
    } else {
      out += upper ? static_cast<char>(std::toupper(static_cast<unsigned char>(*c))) : *c;
      upper = false;
    }
  }
  return out;
}

// A new autograd node, held the way the installed torch holds them: std::shared_ptr<Node> in torch 2.11 (Node
// derives from std::enable_shared_from_this), c10::intrusive_ptr<Node> in 2.15 (Node is an intrusive_ptr_target).
// set_history and collect_next_edges take whichever the headers declare.
template <class T, class... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
}

// Loss parameters are kept as IValues: a string_view argument must not outlive the call.
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

// The name of the index-th parameter in a schema fragment such as ", Tensor c, str form".
std::string param_name(const char* params, size_t index) {
  std::string text(params);
  size_t start = 0;
  for (size_t i = 0; i <= index; ++i) start = text.find(',', start) + 1;
  const size_t end = std::min(text.find(',', start), text.size());
  const size_t name = text.find_last_of(' ', end - 1) + 1;
  return text.substr(name, end - name);
}

inline std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

void check_no_grad(const char* op, const char* argument, const at::Tensor& value) {
  TORCH_CHECK(!value.defined() || !value.requires_grad(), "robust_diffusion::", op, ": ", argument,
              " requires grad, but the loss has no gradient with respect to ", argument,
              " (it would silently get none); pass ", argument, ".detach()");
}

void check_param_no_grad(const char* op, const std::string& argument, const at::Tensor& value) {
  check_no_grad(op, argument.c_str(), value);
}
void check_param_no_grad(const char*, const std::string&, double) {}
void check_param_no_grad(const char*, const std::string&, c10::string_view) {}

// Whether the forward computes the input's gradient in the same pass: an eager call on CPU tensors whose input
// needs a gradient. Traced calls (FakeTensor, functionalisation, tensor subclasses, a TorchDispatchMode) keep the
// two operators, so a compiled or exported graph is what it was: there the gradient buffer would only add memory.
// Off only for comparisons (the benchmark's two-pass column) and for anyone who suspects the path:
// set_cpu_one_pass (diagnostics.h), torch.ops.robust_diffusion._set_cpu_one_pass(False), or
// robust_diffusion.ops.cpu_one_pass(False) in Python.
std::atomic<bool> cpu_one_pass{true};

bool fuse_input_gradient(const at::Tensor& input, const at::Tensor& target) {
  constexpr c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                        c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                        c10::DispatchKey::FuncTorchGradWrapper});
  return cpu_one_pass.load() && at::GradMode::is_enabled() && input.requires_grad() && input.device().is_cpu() &&
         input.layout() == at::kStrided && !(input.key_set() | target.key_set()).has_any(traced) &&
         !c10::impl::dispatch_mode_enabled();
}

// The backward of a backward: attached to the gradient when the graph is kept (create_graph=True), it
// raises if anything differentiates through it instead of silently returning zero.
struct DoubleBackwardRefused : public Node {
  explicit DoubleBackwardRefused(std::string op) : op_(std::move(op)) {}
  std::string name() const override { return camel_case(op_.c_str()) + "BackwardBackward0"; }
  variable_list apply(variable_list&& /*grads*/) override {
    TORCH_CHECK(false, "robust_diffusion::", op_, ": double backward (differentiating the gradient) is not supported");
  }
  std::string op_;
};

template <class Loss, class Params = LossParams<Loss>>
struct LossAutograd;

template <class Loss, class... P>
struct LossAutograd<Loss, c10::guts::typelist::typelist<P...>> {
  // grad_fn of the loss. Next edges: input (0), target (1).
  struct Backward : public torch::autograd::TraceableFunction {
    std::string name() const override { return camel_case(Loss::name) + "Backward0"; }

    variable_list apply(variable_list&& grads) override {
      variable_list result(2);
      const bool need_input = should_compute_output(0), need_target = should_compute_output(1);
      if (!grads[0].defined() || !(need_input || need_target)) return result;
      const at::Tensor target = target_.unpack();
      // create_graph needs the backward operator (it refuses double backward); compiled autograd traces it.
      const bool use_unit_grad = unit_grad_.defined() && !at::GradMode::is_enabled() && !compiled_;
      const at::Tensor grad = use_unit_grad ? scale_unit_grad(grads[0])
                                            : call_backward(grads[0], input_.unpack(), target,
                                                            std::index_sequence_for<P...>{});
      if (need_target) result[1] = grad.neg().to(target.scalar_type());  // d r / d target = -1
      if (need_input) result[0] = grad;
      return result;
    }

    // The forward's gradient (for an upstream gradient of 1) times the upstream gradient g. When the graph is
    // being freed (no retain_graph) the buffer is handed over: returned as it is when g is 1, so AccumulateGrad
    // can adopt it as .grad with no copy, else scaled in place. A kept graph gets a new tensor every time, so the
    // buffer stays as the forward wrote it for the next backward. Reading g costs no sync: it is on the CPU.
    at::Tensor scale_unit_grad(const at::Tensor& g) {
      std::lock_guard<std::mutex> lock(mutex_);
      at::Tensor grad = releasing_ ? std::exchange(unit_grad_, at::Tensor()) : unit_grad_;
      const bool none = reduction_ == "none";
      const bool unit = none ? at::all(g == 1).item<bool>() : g.item<double>() == 1.0;
      if (unit) return releasing_ ? grad : grad.clone();
      std::vector<int64_t> per_sample(grad.dim(), 1);  // "none": g_b for every element of sample b
      per_sample[0] = grad.size(0);
      const at::Tensor factor = none ? g.reshape(per_sample) : g;
      at::Tensor out = releasing_ ? grad : at::empty_like(grad);
      return at::mul_out(out, grad, factor);
    }

    template <size_t... I>
    at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             std::index_sequence<I...>) {
      return LossOperator<Loss>::backward().call(grad_loss, input, target, scale_.unpack(),
                                                 optional_tensor(weight_.unpack()), influence_.unpack(),
                                                 dim_reduction_, reduction_, FromIValue<P>::get(params_[I])...);
    }

    void will_release_variables() override { releasing_ = true; }

    void release_variables() override {
      std::lock_guard<std::mutex> lock(mutex_);
      unit_grad_.reset();
      input_.reset_data();
      target_.reset_data();
      scale_.reset_data();
      weight_.reset_data();
      influence_.reset_data();
    }

    // Compiled autograd: the saved state that identifies this node, and apply() on swapped-in tensors.
    void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
      args.collect(input_, false);
      args.collect(target_, false);
      args.collect(scale_, false);
      args.collect(weight_, false);
      args.collect(influence_, false);
      args.collect(dim_reduction_);
      args.collect(reduction_);
      args.collect(params_);
    }
    variable_list apply_with_saved(const variable_list& inputs,
                                   torch::dynamo::autograd::SwapSavedVariables& saved) override {
      saved.before(input_), saved.before(target_), saved.before(scale_), saved.before(weight_);
      saved.before(influence_), saved.before(params_);
      compiled_ = true;  // traced on proxies: the backward operator, never the forward's buffer
      variable_list result = apply(variable_list(inputs));
      compiled_ = false;
      saved.after(input_), saved.after(target_), saved.after(scale_), saved.after(weight_);
      saved.after(influence_), saved.after(params_);
      return result;
    }

    SavedVariable input_, target_, scale_, weight_, influence_;
    std::string dim_reduction_, reduction_;
    std::vector<c10::IValue> params_;
    // The input's gradient from <loss>_with_grad (undefined on the two-pass path): private to this node until
    // a backward that frees the graph hands it over. It holds N elements from the forward to the backward.
    at::Tensor unit_grad_;
    bool releasing_ = false, compiled_ = false;
  };

  template <size_t... I>
  static void check_params_no_grad(std::index_sequence<I...>, const P&... params) {
    (check_param_no_grad(Loss::name, param_name(Loss::params, I), params), ...);
  }

  // The autograd kernel of the forward operator.
  static LossOutputs forward(const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                             const std::optional<at::Tensor>& weight, c10::string_view dim_reduction,
                             c10::string_view reduction, P... params) {
    const bool differentiable = torch::autograd::compute_requires_grad(input, target);
    if (at::GradMode::is_enabled()) {
      check_no_grad(Loss::name, "scale", scale);
      check_no_grad(Loss::name, "weight", weight.value_or(at::Tensor()));
      check_params_no_grad(std::index_sequence_for<P...>{}, params...);
    }
    at::Tensor unit_grad;
    LossOutputs outputs = [&]() -> LossOutputs {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (differentiable && fuse_input_gradient(input, target)) {
        auto [loss, penalty, influence, grad] =
            LossOperator<Loss>::with_grad().call(input, target, scale, weight, dim_reduction, reduction, params...);
        unit_grad = std::move(grad);
        return {loss, penalty, influence};
      }
      return LossOperator<Loss>::forward().call(input, target, scale, weight, dim_reduction, reduction, params...);
    }();
    if (differentiable) {
      auto node = make_node<Backward>();
      node->set_next_edges(torch::autograd::collect_next_edges(input, target));
      node->input_ = SavedVariable(input, false);
      node->target_ = SavedVariable(target, false);
      node->scale_ = SavedVariable(scale, false);
      node->weight_ = SavedVariable(weight.value_or(at::Tensor()), false);
      node->influence_ = SavedVariable(std::get<2>(outputs), false);  // an output, but not differentiable
      node->dim_reduction_ = std::string(dim_reduction);
      node->reduction_ = std::string(reduction);
      node->params_ = {to_ivalue(params)...};
      node->unit_grad_ = std::move(unit_grad);
      torch::autograd::set_history(std::get<0>(outputs), node);  // penalty and influence get no history
    }
    return outputs;
  }

  // The autograd kernel of <loss>_with_grad, an operator for the forward above: it has no derivative itself.
  static LossOutputsWithGrad with_grad(const at::Tensor& input, const at::Tensor& target, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& weight, c10::string_view dim_reduction,
                                       c10::string_view reduction, P... params) {
    TORCH_CHECK(!torch::autograd::compute_requires_grad(input, target), "robust_diffusion::", Loss::name,
                "_with_grad: input and target must not require grad (it returns the gradient; call ", Loss::name,
                " for a differentiable loss)");
    at::AutoDispatchBelowADInplaceOrView guard;
    return LossOperator<Loss>::with_grad().call(input, target, scale, weight, dim_reduction, reduction, params...);
  }

  // The autograd kernel of <loss>_backward: computes it, and refuses to be differentiated.
  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                             const at::Tensor& influence, c10::string_view dim_reduction, c10::string_view reduction,
                             P... params) {
    const bool differentiable =
        torch::autograd::compute_requires_grad(grad_loss, input, target, scale, weight, influence);
    at::Tensor grad = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return LossOperator<Loss>::backward().call(grad_loss, input, target, scale, weight, influence, dim_reduction,
                                                 reduction, params...);
    }();
    if (differentiable) {
      auto node = make_node<DoubleBackwardRefused>(Loss::name);
      node->set_next_edges(torch::autograd::collect_next_edges(grad_loss, input, target, scale, weight, influence));
      torch::autograd::set_history(grad, node);
    }
    return grad;
  }
};

}  // namespace

bool set_cpu_one_pass(bool enabled) { return cpu_one_pass.exchange(enabled); }

TORCH_LIBRARY_IMPL(robust_diffusion, Autograd, m) {
  losses::for_each_loss([&](auto loss) {
    using Loss = decltype(loss);
    m.impl(Loss::name, &LossAutograd<Loss>::forward);
    m.impl((std::string(Loss::name) + "_with_grad").c_str(), &LossAutograd<Loss>::with_grad);
    m.impl((std::string(Loss::name) + "_backward").c_str(), &LossAutograd<Loss>::backward);
  });
}

}  // namespace robust_diffusion
