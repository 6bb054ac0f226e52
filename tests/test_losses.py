"""The loss operators against float64 references: values, gradients, dtypes, layouts, registration
(opcheck, torch.compile, TorchScript), determinism and error messages."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import robust_diffusion as rd
from conftest import subprocess_pythonpath
from loss_reference import CASE_IDS, loss_cases, reference

OPS = torch.ops.robust_diffusion
SHAPES = [(1, 7), (5, 3, 11, 13), (4, 1), (3, 40001)]  # B = 1, odd sizes, D = 1, several CPU chunks
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(shape, seed, dtype=torch.float64, device="cpu", spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    y = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    scale = torch.rand(shape[0], generator=g, dtype=torch.float64) * 2
    weight = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5
    return x.to(device, dtype), y.to(device, dtype), scale.to(device), weight.to(device)


def case_for(case_id, batch, seed=0):
    cases = loss_cases(batch, torch.Generator().manual_seed(seed))
    return next(c for c in cases if c.id == case_id)


def call(case, x, y, scale, weight=None, dim_reduction="mean", reduction="mean"):
    params = tuple(p.to(x.device) if isinstance(p, torch.Tensor) else p for p in case.params)
    return getattr(OPS, case.op)(x, y, scale, weight, dim_reduction, reduction, *params)


def functional_call(case, x, y, t=None, c=None, **kwargs):
    """The Python API's call of ``case`` (rd.<op>) with its parameters as keyword arguments; ``c`` replaces
    pseudo-Huber's per-sample c (so that a compiled function can take it as an input)."""
    if case.op == "alpha_loss":
        kwargs["alpha"] = case.params[0]
    elif case.op == "huber_loss":
        kwargs["delta"] = case.params[0]
    elif case.op == "pseudo_huber_loss":
        kwargs.update(c=case.params[0].to(x) if c is None else c, form=case.params[1])
    elif case.op == "clipped_mse_loss":
        kwargs.update(tau=case.params[0], mode=case.params[1])
    return getattr(rd, case.op)(x, y, t, **kwargs)


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dim_reduction", ["mean", "sum"])
def test_forward_matches_float64_reference(case_id, shape, dim_reduction, device):
    x, y, scale, weight = make_inputs(shape, seed=1, device=device)
    case = case_for(case_id, shape[0])
    if dim_reduction == "sum":
        scale = scale / x[0].numel()  # keep delta in the interesting range
    for reduction in REDUCTIONS:
        loss, R, w = call(case, x, y, scale, weight, dim_reduction, reduction)
        ref_loss, ref_R, ref_w = reference(case, x.cpu(), y.cpu(), scale.cpu(), weight.cpu(), dim_reduction, reduction)
        torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(R.cpu(), ref_R, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-7, atol=1e-12)


def test_kl_and_huber_equal_pytorch_losses():
    x, y = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    assert rd.kl_loss(x, y).item() == pytest.approx(F.mse_loss(x, y).item(), rel=1e-6)
    assert rd.huber_loss(x, y, delta=0.5).item() == pytest.approx(F.huber_loss(x, y, delta=0.5).item(), rel=1e-6)
    a = x.clone().requires_grad_()
    rd.kl_loss(a, y).backward()
    b = x.clone().requires_grad_()
    F.mse_loss(b, y).backward()
    torch.testing.assert_close(a.grad, b.grad)


# Tolerances of low-precision inputs against the float64 reference of the *rounded* inputs: the
# kernels accumulate in float32, so the error is float32 accumulation, not the storage format.
LOW_PRECISION_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case_id", ["kl", "hellinger", "ned", "huber", "pseudo_huber-huber", "clipped-element"])
def test_low_precision_inputs(dtype, case_id, device):
    x, y, scale, weight = make_inputs((4, 3, 17, 19), seed=2, device=device)
    x, y = x.to(dtype), y.to(dtype)
    case = case_for(case_id, 4)
    loss, R, w = call(case, x, y, scale, weight, "mean", "none")
    assert loss.dtype == R.dtype == w.dtype == torch.float32
    ref_loss, ref_R, ref_w = reference(case, x.double().cpu(), y.double().cpu(), scale.cpu(), weight.cpu(), "mean", "none")
    tol = LOW_PRECISION_TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(w.double().cpu(), ref_w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_input_with_float32_target(dtype, device):
    x, y, scale, _ = make_inputs((4, 3, 8, 8), seed=3, device=device)
    xl, yf = x.to(dtype).requires_grad_(), y.float()
    case = case_for("hellinger", 4)
    loss, _, w = call(case, xl, yf, scale.float())
    ref_loss, _, ref_w = reference(case, xl.detach().double().cpu(), yf.double().cpu(), scale.cpu())
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=2e-5, atol=1e-6)
    loss.backward()
    assert xl.grad.dtype == dtype
    xr = xl.detach().double().requires_grad_()
    reference(case, xr, yf.double(), scale.double())[0].backward()
    torch.testing.assert_close(xl.grad.double().cpu(), xr.grad.cpu(), rtol=1e-2, atol=1e-4)


def test_mixed_float32_input_float64_target_is_promoted():
    x, y, scale, _ = make_inputs((3, 5), seed=4)
    loss, _, _ = call(case_for("ned", 3), x.float(), y, scale)
    assert loss.dtype == torch.float64


def test_non_contiguous_inputs(device):
    x, y, scale, weight = make_inputs((6, 4, 10, 12), seed=5, device=device)
    xt, yt = x.transpose(2, 3), y.transpose(2, 3)  # same shape as each other, strided
    assert not xt.is_contiguous()
    case = case_for("alpha", 6)
    for a, b in ((xt, yt), (x[:, ::2], y[:, ::2]), (x[..., 1:], y[..., 1:])):
        got = call(case, a, b, scale, weight, "mean", "none")[0]
        torch.testing.assert_close(got, call(case, a.contiguous(), b.contiguous(), scale, weight, "mean", "none")[0],
                                   rtol=0, atol=0)
        a = a.clone().requires_grad_()
        call(case, a, b, scale, weight)[0].backward()
        ref = a.detach().clone().requires_grad_()
        reference(case, ref, b, scale, weight)[0].backward()
        torch.testing.assert_close(a.grad, ref.grad)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(case_id, reduction):
    for seed in (0, 1):
        x, y, scale, weight = make_inputs((3, 2, 5), seed=seed)
        case = case_for(case_id, 3, seed)
        if case.kind == "clipped_mse" and case.params[1] == "sample":
            scale = scale * 0.3  # keep samples away from the kink at tau, where the derivative jumps
        if case.kind == "chi2":
            scale = scale * 0.1  # w = exp(2 delta) grows too fast for finite differences otherwise
        x.requires_grad_()
        y.requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: call(case, a, b, scale, weight, "mean", reduction)[0], (x, y))


def test_target_gradient_only(device):
    x, y, scale, _ = make_inputs((2, 9), seed=6, device=device)
    y.requires_grad_()
    case = case_for("alpha", 2)  # closed form: the reference is differentiable
    call(case, x, y, scale)[0].backward()
    yr = y.detach().clone().requires_grad_()
    reference(case, x, yr, scale)[0].backward()
    torch.testing.assert_close(y.grad, yr.grad)


def test_gradient_matches_weighted_mse_gradient():
    """docs/DESIGN.md, Divergences: the divergence gradient is w(delta) times the MSE gradient, per sample."""
    x, y, scale, _ = make_inputs((5, 3, 4, 4), seed=7)
    x.requires_grad_()
    loss, _, w = OPS.ned_loss(x, y, scale, None, "mean", "none")
    loss.sum().backward()
    expected = w.reshape(-1, 1, 1, 1) * scale.reshape(-1, 1, 1, 1) * 2 * (x - y).detach() / x[0].numel()
    torch.testing.assert_close(x.grad, expected)


def test_double_backward_raises():
    x, y, scale, _ = make_inputs((2, 3), seed=8)
    x.requires_grad_()
    (g,) = torch.autograd.grad(OPS.hellinger_loss(x, y, scale, None, "mean", "mean")[0], x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        g.sum().backward()
    assert g.grad_fn.name() == "HellingerLossBackwardBackward0"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_grad_fn_names_the_loss(case_id):
    """grad_fn reads like PyTorch's own (MseLossBackward0): HellingerLossBackward0, PseudoHuberLossBackward0."""
    case = case_for(case_id, 3)
    x, y, scale, weight = make_inputs((3, 4), seed=1)
    loss = call(case, x.requires_grad_(), y, scale, weight)[0]
    expected = "".join(part.capitalize() for part in case.op.split("_")) + "Backward0"
    assert loss.grad_fn.name() == expected
    assert f"grad_fn=<{expected}>" in repr(loss)
    # through the Python API too, and the functional call's gradient still flows
    assert functional_call(case, x, y).grad_fn.name() == expected


@pytest.mark.parametrize("argument", ["scale", "weight", "c"])
def test_an_argument_without_a_gradient_that_requires_grad_is_refused(argument):
    """scale, weight and pseudo-Huber's c get no gradient: one that requires grad would silently stay without
    one, so the call says so (with grad mode on) instead; detached or under no_grad it runs."""
    x, y, scale, weight = make_inputs((3, 4), seed=2)
    args = dict(scale=scale, weight=weight, c=torch.full((3,), 0.1, dtype=torch.float64))
    args[argument] = args[argument].clone().requires_grad_()

    def run():
        return OPS.pseudo_huber_loss(x.clone().requires_grad_(), y, args["scale"], args["weight"], "mean", "mean",
                                     args["c"], "huber")[0]

    with pytest.raises(RuntimeError, match=f"pseudo_huber_loss: {argument} requires grad.*{argument}.detach"):
        run()
    with torch.no_grad():
        run()
    args[argument] = args[argument].detach()
    run().backward()


def test_compiled_autograd_traces_the_backward():
    """The backward node is traceable by compiled autograd (torch._dynamo.compiled_autograd) and gives the
    eager gradient."""
    x, y, scale, weight = make_inputs((4, 6), seed=3, dtype=torch.float32)
    eager = x.clone().requires_grad_()
    OPS.ned_loss(eager, y, scale, weight, "mean", "mean")[0].backward()
    compiled = x.clone().requires_grad_()
    graphs = []

    def record(graph_module, example_inputs):  # a backend that notes each captured backward graph
        graphs.append(graph_module)
        return graph_module

    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend=record, fullgraph=True)):
        OPS.ned_loss(compiled, y, scale, weight, "mean", "mean")[0].backward()
    torch.testing.assert_close(compiled.grad, eager.grad)
    assert graphs, "compiled autograd did not capture the backward"
    assert any("ned_loss_backward" in str(g.graph) for g in graphs)  # traced through the node, not around it


def test_nan_propagates():
    x, y, scale, _ = make_inputs((3, 4), seed=9)
    x[1, 2] = float("nan")
    x.requires_grad_()
    loss, _, w = OPS.hellinger_loss(x, y, scale, None, "mean", "none")
    assert torch.isnan(loss[1]) and torch.isnan(w[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_nan_propagates_in_every_loss(case_id):
    x, y, scale, weight = make_inputs((3, 4), seed=9)
    y[1, 2] = float("nan")  # in the target this time: the residual is NaN all the same
    x.requires_grad_()
    loss, R, w = call(case_for(case_id, 3), x, y, scale, weight, "mean", "none")
    assert torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad[[0, 2]]).all()
    assert torch.isnan(loss[1]) and torch.isnan(R[1]) and torch.isnan(w[1]) and torch.isnan(x.grad[1]).all()


# sup phi of the losses that stay finite at delta = inf (alpha = 0.3: kappa = 0.21; clipped at tau = 0.8).
SUP_PHI = {"hellinger": 4.0, "ned": math.e - 1, "alpha": 1 / 0.21, "js": 4 * math.log(2), "lecam": 2.0, "tv": 1.0,
           "clipped-sample": 0.8}


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+inf", "-inf"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_inf_input(case_id, sign):
    """What functional.py's "Non-finite inputs" says: an inf residual gives a finite loss (sup phi) and NaN at its
    element's gradient for the bounded losses, inf for the unbounded ones; the other samples are unaffected."""
    x, y, scale, weight = make_inputs((3, 4), seed=9)
    x[1, 2] = sign * math.inf
    x.requires_grad_()
    case = case_for(case_id, 3)
    loss, R, w = call(case, x, y, scale, weight, "mean", "none")
    loss.sum().backward()
    finite_x = x.detach().nan_to_num(posinf=0.0, neginf=0.0)
    ref_loss, _, ref_w = reference(case, finite_x, y, scale, weight, "mean", "none")
    torch.testing.assert_close(loss[[0, 2]], ref_loss[[0, 2]])  # the other samples are unaffected
    torch.testing.assert_close(w[[0, 2]], ref_w[[0, 2]])
    assert torch.isfinite(x.grad[[0, 2]]).all()
    at_inf, rest = x.grad[1, 2], x.grad[1, [0, 1, 3]]
    if case_id in SUP_PHI:  # bounded: finite loss, w = 0, so 0 gradient at the sample's finite elements
        assert R[1] == math.inf and w[1] == 0
        assert loss[1].item() == pytest.approx(weight[1].item() * SUP_PHI[case_id], rel=1e-12)
        assert torch.isnan(at_inf) and (rest == 0).all()
    elif case_id == "chi2":  # saturated at delta = 44
        assert loss[1].item() == pytest.approx(weight[1].item() * math.expm1(88) / 2, rel=1e-12)
        assert w[1].item() == pytest.approx(math.exp(88), rel=1e-12)
        assert at_inf == sign * math.inf and torch.isfinite(rest).all()
    elif case_id == "clipped-element":  # the residual is clamped: a finite loss, no gradient at the element
        assert torch.isfinite(loss[1]) and at_inf == 0 and torch.isfinite(rest).all()
    else:  # kl, huber, pseudo-Huber: unbounded, w = 1
        assert loss[1] == math.inf and w[1] == 1 and torch.isfinite(rest).all()
        if case_id == "kl":
            assert at_inf == sign * math.inf
        elif case_id == "huber":  # F.huber_loss's slope delta, times weight and scale, / D
            assert at_inf.item() == pytest.approx(sign * 0.7 * weight[1].item() * scale[1].item() / 4, rel=1e-12)
        else:
            assert torch.isnan(at_inf)  # r / sqrt(r^2 + c^2) = inf / inf


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_opcheck(case_id, device):
    x, y, scale, weight = make_inputs((3, 2, 5), seed=10, dtype=torch.float32, device=device)
    case = case_for(case_id, 3)
    params = tuple(p.float().to(device) if isinstance(p, torch.Tensor) else p for p in case.params)
    op = getattr(OPS, case.op).default
    for requires_grad in (False, True):
        a = x.clone().requires_grad_(requires_grad)
        for reduction, w in (("mean", weight.float()), ("none", None)):
            torch.library.opcheck(op, (a, y, scale.float(), w, "mean", reduction, *params))
    influence = call(case, x, y, scale.float())[2]
    backward = getattr(OPS, case.op + "_backward").default
    torch.library.opcheck(backward, (torch.tensor(1.0, device=device), x, y, scale.float(), None, influence, "mean",
                                     "mean", *params))


def test_registered_operators():
    for name in rd.ops.LOSS_OPS:
        assert hasattr(OPS, name) and hasattr(OPS, name + "_backward")
        schema = str(getattr(OPS, name).default._schema)
        assert "Tensor input, Tensor target, Tensor scale, Tensor? weight" in schema


def test_the_python_loss_table_is_the_registered_operator_list():
    """ops.LOSS_TABLE (from which every Python list of losses is derived) names exactly the operators that
    csrc/losses.h registers, each with its forward and backward, and its defaults cover the operator's own
    parameters."""
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("robust_diffusion::") and name.endswith("_loss")}
    assert registered == set(rd.ops.LOSS_OPS)
    common = {"input", "target", "scale", "weight", "dim_reduction", "reduction"}
    for entry in rd.ops.LOSS_TABLE:
        own = {a.name for a in getattr(OPS, f"{entry.name}_loss").default._schema.arguments} - common
        assert own <= set(entry.defaults), entry.name
    assert rd.DIVERGENCES == ("kl", "hellinger", "ned", "alpha", "js", "lecam", "tv", "chi2")
    # weighs_samples says which losses' influence weights differ between samples (what sample trust needs).
    x, y, _, _ = make_inputs((6, 5), seed=3, dtype=torch.float64)
    y[0] += 8.0  # an outlier
    t = torch.arange(6) * 100
    for entry in rd.ops.LOSS_TABLE:
        criterion = rd.RobustDiffusionLoss(entry.name, rd.NoiseSchedule.linear(), scale=1.0)
        criterion(x, y, t)
        assert bool((criterion.last_influence != 1).any()) == entry.weighs_samples, entry.name
    assert rd.LOSSES == rd.DIVERGENCES + ("huber", "pseudo_huber", "clipped_mse")


# A meta tensor among CPU arguments makes the dispatcher pick the Meta kernel (csrc/meta_kernels.cpp): it must
# refuse a device mismatch as the real kernels do, not return uninitialised CPU tensors.
@pytest.mark.parametrize("argument", ["target", "scale", "weight", "c"])
def test_meta_tensor_argument_on_another_device_is_an_error(argument):
    x, y, scale, weight = make_inputs((3, 4), seed=14, dtype=torch.float32)
    args = {"target": y, "scale": scale.float(), "weight": weight.float(),
            "c": case_for("pseudo_huber-huber", 3).params[0].float()}
    args[argument] = args[argument].to("meta")
    for requires_grad in (False, True):
        with pytest.raises(ValueError, match=rf"pseudo_huber_loss: {argument} must be on input's device \(cpu\), "
                                             r"got meta"):
            OPS.pseudo_huber_loss(x.clone().requires_grad_(requires_grad), args["target"], args["scale"],
                                  args["weight"], "mean", "mean", args["c"], "huber")


def test_meta_device_mismatch_in_every_operator_and_backward():
    x, y, scale, weight = make_inputs((3, 4), seed=15, dtype=torch.float32)
    scale, weight = scale.float(), weight.float()
    for case_id in CASE_IDS:
        case = case_for(case_id, 3)
        params = float32_params(case)
        with pytest.raises(ValueError, match=rf"{case.op}: target must be on input's device \(cpu\), got meta"):
            getattr(OPS, case.op)(x, y.to("meta"), scale, None, "mean", "none", *params)
        meta_params = tuple(p.to("meta") if isinstance(p, torch.Tensor) else p for p in params)
        with pytest.raises(ValueError, match=rf"{case.op}: target must be on input's device \(meta\), got cpu"):
            getattr(OPS, case.op)(x.to("meta"), y, scale.to("meta"), None, "mean", "none", *meta_params)
        # All on meta: shapes and dtypes without data, as before.
        loss, penalty, influence = getattr(OPS, case.op)(x.to("meta"), y.to("meta"), scale.to("meta"), None, "mean",
                                                         "none", *meta_params)
        assert loss.device.type == "meta" and loss.shape == penalty.shape == influence.shape == (3,)
    influence = OPS.ned_loss(x, y, scale, None, "mean", "mean")[2]
    args = {"grad_loss": torch.tensor(1.0), "target": y, "scale": scale, "weight": weight, "influence": influence}
    for argument in args:
        bad = dict(args, **{argument: args[argument].to("meta")})
        with pytest.raises(ValueError, match=rf"ned_loss: {argument} must be on input's device \(cpu\), got meta"):
            OPS.ned_loss_backward(bad["grad_loss"], x, bad["target"], bad["scale"], bad["weight"], bad["influence"],
                                  "mean", "mean")


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_torch_compile_fullgraph_dynamic(case_id):
    torch._dynamo.reset()
    case = case_for(case_id, 4)

    def step(x, y, t, c):
        x = x * 1.0  # something to fuse around the operator
        return functional_call(case, x, y, t, c=c, scale=0.7, reduction="mean")

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for shape in ((4, 3, 8, 8), (7, 3, 8, 8)):
        x, y = torch.randn(shape, requires_grad=True), torch.randn(shape)
        t = torch.randint(0, 1000, (shape[0],))
        c = case_for(case_id, shape[0]).params[0].float() if case.op == "pseudo_huber_loss" else None
        eager = step(x, y, t, c)
        (ge,) = torch.autograd.grad(eager, x)
        got = compiled(x, y, t, c)
        (gc,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(gc, ge)


class ScriptedLoss(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        loss = torch.ops.robust_diffusion.hellinger_loss(x, y, scale, None, "mean", "mean")[0]
        return loss + torch.ops.robust_diffusion.alpha_loss(x, y, scale, None, "sum", "mean", 0.3)[0]


def test_torchscript_script_save_load():
    module = torch.jit.script(ScriptedLoss())
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x, y, scale, _ = make_inputs((3, 4, 5), seed=11, dtype=torch.float32)
    scale = scale.float()
    torch.testing.assert_close(loaded(x, y, scale), ScriptedLoss()(x, y, scale))


class ScriptedOperator(torch.nn.Module):
    """One loss operator, chosen by name. TorchScript cannot look an operator up by a string at run time, so
    forward has a branch per operator; ``number`` and ``text`` hold the operator's float and str parameters and
    ``c`` pseudo-Huber's per-sample c."""

    def __init__(self, op: str, number: float = 0.0, text: str = ""):
        super().__init__()
        self.op, self.number, self.text = op, number, text

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, weight: Optional[torch.Tensor],
                c: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.robust_diffusion
        if self.op == "kl_loss":
            return ops.kl_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "hellinger_loss":
            return ops.hellinger_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "ned_loss":
            return ops.ned_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "alpha_loss":
            return ops.alpha_loss(x, y, scale, weight, "mean", "none", self.number)[0]
        if self.op == "js_loss":
            return ops.js_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "lecam_loss":
            return ops.lecam_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "tv_loss":
            return ops.tv_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "chi2_loss":
            return ops.chi2_loss(x, y, scale, weight, "mean", "none")[0]
        if self.op == "huber_loss":
            return ops.huber_loss(x, y, scale, weight, "mean", "none", self.number)[0]
        if self.op == "pseudo_huber_loss":
            return ops.pseudo_huber_loss(x, y, scale, weight, "mean", "none", c, self.text)[0]
        if self.op == "clipped_mse_loss":
            return ops.clipped_mse_loss(x, y, scale, weight, "mean", "none", self.number, self.text)[0]
        raise RuntimeError("unknown operator " + self.op)


def scripted_operator(case) -> ScriptedOperator:
    numbers = [p for p in case.params if isinstance(p, float)]
    texts = [p for p in case.params if isinstance(p, str)]
    return ScriptedOperator(case.op, numbers[0] if numbers else 0.0, texts[0] if texts else "")


def float32_params(case):
    return tuple(p.float() if isinstance(p, torch.Tensor) else p for p in case.params)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_torchscript_operator_script_save_load(case_id):
    case = case_for(case_id, 3)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(scripted_operator(case)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert loaded.op == case.op
    x, y, scale, weight = make_inputs((3, 4, 5), seed=11, dtype=torch.float32)
    scale, weight = scale.float(), weight.float()
    c = case.params[0].float() if case.op == "pseudo_huber_loss" else torch.empty(0)
    expected = getattr(OPS, case.op)(x, y, scale, weight, "mean", "none", *float32_params(case))[0]
    torch.testing.assert_close(loaded(x, y, scale, weight, c), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded(x, y, scale, None, c), call(case, x, y, scale, None, "mean", "none")[0])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_torch_export(case_id):
    case = case_for(case_id, 3)

    class Module(torch.nn.Module):
        def forward(self, x, y, scale, c):
            params = tuple(c if isinstance(p, torch.Tensor) else p for p in case.params)
            return getattr(torch.ops.robust_diffusion, case.op)(x, y, scale, None, "mean", "none", *params)[0]

    x, y, scale, _ = make_inputs((3, 4, 5), seed=12, dtype=torch.float32)
    c = case.params[0].float() if case.op == "pseudo_huber_loss" else torch.ones(3)
    args = (x, y, scale.float(), c)
    exported = torch.export.export(Module(), args)
    assert any(f"robust_diffusion.{case.op}" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), Module()(*args))


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bitwise_deterministic_across_runs_and_threads(case_id, device):
    x, y, scale, weight = make_inputs((6, 70001), seed=13, dtype=torch.float32, device=device)
    scale = scale.float() / 70001  # dim_reduction="sum": delta of order 1, where no transform is flat
    case = case_for(case_id, 6)
    threads = torch.get_num_threads()

    def run():
        a = x.clone().requires_grad_()
        loss = call(case, a, y, scale, weight.float(), "sum", "mean")[0] * 1e-4
        loss.backward()
        return loss.detach(), a.grad

    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    assert first[1].abs().sum() > 0  # a gradient to compare
    for a, b in ((first, again), (first, single)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def cpu_results(dtype_name: str):
    """Forward outputs and input gradients of every case on CPU inputs with SIMD blocks, chunks and tails."""
    dtype = getattr(torch, dtype_name)
    results = {}
    for shape in [(5, 3, 11, 13), (3, 40001)]:
        x, y, scale, weight = make_inputs(shape, seed=21, dtype=dtype)
        for case_id in CASE_IDS:
            a = x.clone().requires_grad_()
            loss, penalty, influence = call(case_for(case_id, shape[0]), a, y, scale.float(), weight.float(),
                                            reduction="none")
            loss.sum().backward()
            results[(shape, case_id)] = (loss.detach(), penalty, influence, a.grad)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_cpu_instruction_sets_agree(dtype_name, tmp_path):
    """The portable CPU build (ATEN_CPU_CAPABILITY=default) gives what the build this CPU runs gives."""
    out = tmp_path / "default.pt"
    script = (f"import torch, test_losses as t; assert torch.ops.robust_diffusion._cpu_instruction_set() == 'default'; "
              f"torch.save(t.cpu_results({dtype_name!r}), {str(out)!r})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [tests, env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    portable, native = torch.load(out), cpu_results(dtype_name)
    # Lanes are summed in a different order, so the two agree to float32 rounding; bfloat16 gradients
    # are rounded once more on the way out (one bfloat16 ulp).
    grad_tol = dict(rtol=1e-5, atol=1e-7) if dtype_name == "float32" else dict(rtol=8e-3, atol=1e-6)
    for key, (loss, penalty, influence, grad) in native.items():
        other = portable[key]
        for name, a, b in zip(("loss", "penalty", "influence"), (loss, penalty, influence), other[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key} {name}: {m}")
        torch.testing.assert_close(grad, other[3], **grad_tol, msg=lambda m: f"{key} grad: {m}")


# --------------------------------------------------------------------------- the Python API
def test_headline_call():
    e = torch.randn(8, 3, 32, 32, requires_grad=True)
    loss = rd.hellinger_loss(e, torch.randn(8, 3, 32, 32), torch.randint(0, 1000, (8,)))
    loss.backward()
    assert loss.dim() == 0 and e.grad.shape == e.shape


def test_vlb_scale_uses_the_schedule():
    schedule = rd.NoiseSchedule.linear()
    x, y = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 100, 500, 999])
    got = rd.influence_weights(x, y, t, divergence="hellinger", scale="vlb", dim_reduction="sum")
    lam = schedule.vlb_weight[t]
    expected = torch.exp(-lam * ((x - y).double() ** 2).sum((1, 2, 3)) / 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-30)
    assert lam[0].item() == pytest.approx(0.5, rel=1e-3) and lam[1].item() == pytest.approx(0.010, rel=2e-2)


def test_influence_weights_down_weight_outliers():
    x = torch.randn(16, 1, 8, 8)
    y = x + 0.3 * torch.randn_like(x)
    y[:4] += 5 * torch.randn(4, 1, 8, 8)  # four outliers: delta ~ 25, NED w ~ 1e-3
    w = rd.influence_weights(x, y, divergence="ned")
    assert w[:4].max() < 0.01 and w[4:].min() > 0.85


def test_influence_weights_take_the_loss_arguments():
    """weight= and reduction= are accepted (and validated) as in the losses, and do not change the per-sample w."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    weight = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    for divergence, params in (("ned", {}), ("alpha", {"alpha": 0.3}), ("kl", {})):
        loss_kwargs = dict(schedule=rd.NoiseSchedule.cosine(), scale="vlb", dim_reduction="sum", **params)
        plain = rd.influence_weights(x, y, t, divergence=divergence, **loss_kwargs)
        assert plain.shape == (4,)
        for reduction in REDUCTIONS:
            kwargs = dict(loss_kwargs, weight=weight, reduction=reduction)
            rd.divergence_loss(divergence, x, y, t, **kwargs)  # the same keyword arguments as the loss
            w = rd.influence_weights(x, y, t, divergence=divergence, **kwargs)
            assert torch.equal(w, plain), (divergence, reduction)
    scale = rd.NoiseSchedule.cosine().vlb_weight[t]
    torch.testing.assert_close(plain, OPS.kl_loss(x, y, scale, None, "sum", "none")[2])
    torch.testing.assert_close(rd.influence_weights(x, y, divergence="ned", weight=weight),
                               OPS.ned_loss(x, y, torch.ones(4, dtype=torch.float64), None, "mean", "none")[2])
    with pytest.raises(ValueError, match=r"weight must be a float or have one value per sample"):
        rd.influence_weights(x, y, weight=torch.ones(5))
    with pytest.raises(ValueError, match=r"reduction must be 'mean', 'sum' or 'none'"):
        rd.influence_weights(x, y, reduction="avg")


def test_python_api_scale_weight_and_divergence_params():
    x, y = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    weight = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    got = rd.alpha_loss(x, y, alpha=0.25, scale=scale, weight=weight, reduction="none")
    kappa = 0.25 * 0.75
    expected = weight * -torch.expm1(-kappa * scale * ((x - y) ** 2).mean(1)) / kappa
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(rd.divergence_loss("alpha", x, y, alpha=0.25, scale=scale, weight=weight,
                                                  reduction="none"), got)


# --------------------------------------------------------------------------- errors
BAD_CALLS = [
    (lambda x, y, t: rd.hellinger_loss(x, y[:, :2]), ValueError, r"target must have the shape of input"),
    (lambda x, y, t: rd.hellinger_loss(x, y.to(torch.int64)), TypeError, r"target must be float32"),
    (lambda x, y, t: rd.hellinger_loss(x, y, t.float()), TypeError, r"t must hold integer timesteps"),
    (lambda x, y, t: rd.hellinger_loss(x, y, t + 1000), ValueError, r"t must lie in \[0, 1000\)"),
    (lambda x, y, t: rd.hellinger_loss(x, y, t[:2]), ValueError, r"t must be a 1-D tensor with one timestep per sample"),
    (lambda x, y, t: rd.hellinger_loss(x, y, scale=torch.ones(2)), ValueError, r"scale must be a float or have one value per sample"),
    (lambda x, y, t: rd.hellinger_loss(x, y, scale=-1.0), ValueError, r"scale must be non-negative"),
    (lambda x, y, t: rd.hellinger_loss(x, y, scale="adaptive"), ValueError, r"adaptive scale needs running state"),
    (lambda x, y, t: rd.hellinger_loss(x, y, scale="vlb"), ValueError, r"scale='vlb' needs the timesteps t"),
    (lambda x, y, t: rd.hellinger_loss(x, y, weight=torch.ones(5)), ValueError, r"weight must be a float or have one value per sample"),
    (lambda x, y, t: rd.alpha_loss(x, y, alpha=1.0), ValueError, r"alpha must lie in the open interval \(0, 1\)"),
    (lambda x, y, t: rd.hellinger_loss(x, y, reduction="avg"), ValueError, r"reduction must be 'mean', 'sum' or 'none'"),
    (lambda x, y, t: rd.hellinger_loss(x, y, dim_reduction="max"), ValueError, r"dim_reduction must be 'sum' or 'mean'"),
    (lambda x, y, t: rd.hellinger_loss(x[:0], y[:0]), ValueError, r"input has an empty batch"),
    (lambda x, y, t: rd.hellinger_loss(x[0, 0, 0, 0], y[0, 0, 0, 0]), ValueError, r"leading batch dimension"),
    (lambda x, y, t: rd.huber_loss(x, y, delta=0.0), ValueError, r"delta must be positive"),
    (lambda x, y, t: rd.pseudo_huber_loss(x, y, c=-0.1), ValueError, r"c must be positive"),
    (lambda x, y, t: rd.pseudo_huber_loss(x, y, form="l1"), ValueError, r"form must be 'huber' or 'smooth_l1'"),
    (lambda x, y, t: rd.clipped_mse_loss(x, y, tau=1.0, mode="row"), ValueError, r"mode must be 'sample' or 'element'"),
    (lambda x, y, t: rd.divergence_loss("kullback", x, y), ValueError, r"divergence must be one of"),
]


@pytest.mark.parametrize("bad_call, error, message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_messages(bad_call, error, message):
    x, y, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randint(0, 1000, (4,))
    with pytest.raises(error, match=message):
        bad_call(x, y, t)


def test_operator_level_errors_name_the_argument():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"hellinger_loss: scale must have one value per sample, shape \[4\]"):
        OPS.hellinger_loss(x, y, torch.ones(3), None, "mean", "mean")
    with pytest.raises(ValueError, match=r"ned_loss: influence must have shape \[4\]"):
        OPS.ned_loss_backward(torch.tensor(1.0), x, y, torch.ones(4), None, torch.ones(2), "mean", "mean")
    with pytest.raises(ValueError, match=r"grad_loss must have shape \[4\] for reduction='none'"):
        OPS.kl_loss_backward(torch.tensor(1.0), x, y, torch.ones(4), None, torch.ones(4), "mean", "none")
