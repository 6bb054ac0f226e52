"""The one-pass forward + gradient on the CPU (<loss>_with_grad; docs/DESIGN.md, Kernels): the same values and
bitwise the same gradients as the two passes, used only where it is safe, and a buffer that no retained graph,
accumulation, hook or second backward can see changed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import robust_diffusion as rd
from conftest import subprocess_pythonpath
from loss_reference import CASE_IDS
from test_losses import OPS, call, case_for, make_inputs

# One chunk per sample (samples are the tasks) and several (chunks are shared by the threads).
SHAPES = [(5, 3, 11, 13), (3, 40001)]
DTYPES = {"float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64),
          "bfloat16": (torch.bfloat16, torch.bfloat16), "float16": (torch.float16, torch.float16),
          "bfloat16-float32": (torch.bfloat16, torch.float32)}


def inputs(shape, dtypes, seed=0):
    x, y, scale, weight = make_inputs(shape, seed=seed)
    return x.to(dtypes[0]), y.to(dtypes[1]), scale.float(), weight.float()


def operators_run(fn) -> set:
    """The robust_diffusion operators fn() calls, by name, as the profiler sees them."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name.split("::")[1] for e in prof.function_events if e.name.startswith("robust_diffusion::")}


def test_the_build_uses_torch_threads():
    """at::parallel_for is inline: a build without OpenMP would run every CPU kernel on one thread."""
    if torch.backends.openmp.is_available():
        assert OPS._cpu_parallel_backend() == "openmp"


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_pass_equals_two_passes_bitwise(case_id, dtype, reduction):
    for shape in SHAPES:
        x, y, scale, weight = inputs(shape, DTYPES[dtype])
        case = case_for(case_id, shape[0])
        params = tuple(p.float() if isinstance(p, torch.Tensor) else p for p in case.params)
        loss, penalty, influence, grad = getattr(OPS, case.op + "_with_grad")(x, y, scale, weight, "mean", reduction,
                                                                            *params)
        forward = getattr(OPS, case.op)(x, y, scale, weight, "mean", reduction, *params)
        for a, b in zip((loss, penalty, influence), forward):
            assert torch.equal(a, b)
        ones = torch.ones_like(loss)
        two_pass = getattr(OPS, case.op + "_backward")(ones, x, y, scale, weight, influence, "mean", reduction, *params)
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert torch.equal(grad, two_pass), (shape, (grad - two_pass).abs().max())
        # and through autograd: loss.backward() hands over that gradient
        a = x.clone().requires_grad_()
        out = getattr(OPS, case.op)(a, y, scale, weight, "mean", reduction, *params)[0]
        (out.sum() if reduction == "none" else out).backward()
        assert torch.equal(a.grad, two_pass)


def gradient_with_ordinary_stores(x, y, scale, influence):
    """The backward operator's gradient for loss.backward() of hellinger_loss(x, y, scale) (reduction "mean"),
    computed over slices of the batch small enough that no call streams its gradient: the reference for the
    streamed one. Each slice gets the upstream gradient 1 / B per sample, rounded as the operator rounds it."""
    B, D = x.shape
    slice_bytes = OPS._cpu_last_level_cache_bytes() // 4
    step = max(1, slice_bytes // (3 * D * x.element_size()))
    per_sample = (torch.ones((), dtype=influence.dtype) / B).expand(B)  # the operator's 0-dim division
    return torch.cat([OPS.hellinger_loss_backward(per_sample[i:i + step].contiguous(), x[i:i + step], y[i:i + step],
                                                  scale[i:i + step], None, influence[i:i + step], "mean", "none")
                      for i in range(0, B, step)])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("D", [16384, 262144, 3 * 16384 + 5], ids=["one chunk", "sixteen chunks", "misaligned"])
def test_beyond_the_last_level_cache_the_streamed_gradient_is_the_same(dtype, D):
    """Where input, target and gradient exceed the last-level cache both kernels write the gradient with
    non-temporal stores (where a chunk is aligned for them; samples of 3 * 16384 + 5 elements mostly are not): the
    one-pass gradient, the backward operator's and what loss.backward() hands over are bitwise the gradient written
    with ordinary stores."""
    llc = OPS._cpu_last_level_cache_bytes()
    if llc > (256 << 20):
        pytest.skip(f"a {llc >> 20} MB last-level cache: the test would need over 1.5 GB")
    itemsize = torch.empty((), dtype=dtype).element_size()
    B = -(-2 * llc // (3 * D * itemsize))  # input, target and gradient twice the cache
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(dtype)
    y = (x.float() + torch.randn(B, D, generator=g).mul_(torch.rand(B, 1, generator=g) * 3)).to(dtype)
    scale = torch.full((B,), 0.5)
    loss, penalty, influence, grad = OPS.hellinger_loss_with_grad(x, y, scale, None, "mean", "mean")
    assert influence.min() < 0.9  # not vacuous: the samples differ in their weight
    # the reference itself, where the whole call stays below the cache: the backward of the whole batch
    few = max(1, llc // (8 * D * itemsize))
    few_influence = OPS.hellinger_loss(x[:few], y[:few], scale[:few], None, "mean", "mean")[2]
    assert torch.equal(gradient_with_ordinary_stores(x[:few], y[:few], scale[:few], few_influence),
                       OPS.hellinger_loss_backward(torch.ones(()), x[:few], y[:few], scale[:few], None, few_influence,
                                                   "mean", "mean"))
    reference = gradient_with_ordinary_stores(x, y, scale, influence)
    assert torch.equal(grad, reference), (grad - reference).abs().max()
    del grad
    backward = OPS.hellinger_loss_backward(torch.ones_like(loss), x, y, scale, None, influence, "mean", "mean")
    assert torch.equal(backward, reference), (backward - reference).abs().max()
    del backward
    a = x.requires_grad_()
    OPS.hellinger_loss(a, y, scale, None, "mean", "mean")[0].backward()
    assert torch.equal(a.grad, reference)


@pytest.mark.slow
def test_the_avx2_build_streams_the_same_gradient():
    """The AVX2 build's non-temporal stores (32 bytes each, against AVX-512's 64), run here by ATen's switch."""
    if OPS._cpu_instruction_set() not in ("avx2", "avx512"):
        pytest.skip("this CPU runs no AVX2 build")
    if OPS._cpu_last_level_cache_bytes() > (256 << 20):
        pytest.skip("a last-level cache too large for this test's memory")
    script = ("import torch, test_fused_gradient as t; "
              "assert torch.ops.robust_diffusion._cpu_instruction_set() == 'avx2'\n"
              "for dtype in (torch.float32, torch.bfloat16, torch.float64):\n"
              "    for D in (16384, 3 * 16384 + 5):\n"
              "        t.test_beyond_the_last_level_cache_the_streamed_gradient_is_the_same(dtype, D)")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [tests, env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_is_bitwise_the_same_for_any_thread_count(threads):
    x, y, scale, weight = inputs((3, 40001), DTYPES["float32"], seed=4)
    reference = OPS.ned_loss_with_grad(x, y, scale, weight, "mean", "mean")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = OPS.ned_loss_with_grad(x, y, scale, weight, "mean", "mean")
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def two_pass_grad(case, x, y, scale, weight, reduction, upstream):
    """The gradient by the backward operator (what create_graph and every traced path run)."""
    a = x.clone().requires_grad_()
    out = call(case, a, y, scale, weight, "mean", reduction)[0]
    (g,) = torch.autograd.grad(out, a, upstream, create_graph=True)
    return g.detach()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_upstream_gradient_other_than_one_scales_the_gradient(reduction, dtype):
    """Gradient accumulation's loss / k, a GradScaler's scale, a per-sample weighting of reduction='none'."""
    x, y, scale, weight = inputs((4, 3, 9, 7), DTYPES[dtype], seed=5)
    case = case_for("hellinger", 4)
    upstream = torch.tensor(0.25) if reduction == "mean" else torch.tensor([0.5, 2.0, 0.0, -1.0])
    a = x.clone().requires_grad_()
    out = call(case, a, y, scale, weight, "mean", reduction)[0]
    out.backward(upstream)
    expected = two_pass_grad(case, x, y, scale, weight, reduction, upstream)
    tol = dict(rtol=0, atol=0) if reduction == "mean" and dtype == "float32" else dict(rtol=8e-3, atol=1e-7)
    torch.testing.assert_close(a.grad, expected, **tol)  # 0.25 is a power of two: exact in float32
    if reduction == "none":
        assert torch.equal(a.grad[2], torch.zeros_like(a.grad[2]))


def test_retain_graph_backward_twice_and_accumulation():
    """A kept graph gives the same gradient every time and accumulates into .grad; the node's buffer is never
    the tensor handed out, so changing .grad in place (or a hook that does) cannot change a later backward."""
    x, y, scale, weight = inputs((4, 2, 8, 8), DTYPES["float32"], seed=6)
    case = case_for("ned", 4)
    expected = two_pass_grad(case, x, y, scale, weight, "mean", torch.tensor(1.0))
    a = x.clone().requires_grad_()
    loss = call(case, a, y, scale, weight)[0]
    loss.backward(retain_graph=True)
    assert torch.equal(a.grad, expected)
    a.grad.mul_(0.0)  # an optimizer zeroing .grad in place
    handle = a.register_hook(lambda g: g.mul_(3.0))  # a hook that changes the gradient in place
    loss.backward(retain_graph=True)
    handle.remove()
    assert torch.equal(a.grad, 3.0 * expected)
    loss.backward()  # frees the graph: the buffer itself is handed over and accumulated
    assert torch.equal(a.grad, 4.0 * expected)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_the_gradient_is_adopted_without_a_copy_when_the_graph_is_freed():
    x, y, scale, _ = inputs((4, 5, 6), DTYPES["float32"], seed=7)
    a = x.clone().requires_grad_()
    seen = []
    loss = OPS.hellinger_loss(a, y, scale, None, "mean", "mean")[0]
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_inputs[0].data_ptr()))
    loss.backward()
    assert seen == [a.grad.data_ptr()]  # the node's output became .grad itself


def test_input_and_target_gradients_and_a_non_leaf_input():
    x, y, scale, weight = inputs((3, 4, 5), DTYPES["float32"], seed=8)
    case = case_for("alpha", 3)
    expected = two_pass_grad(case, x, y, scale, weight, "sum", torch.tensor(1.0))
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    call(case, a * 1.0, b, scale, weight, "mean", "sum")[0].backward()  # a * 1.0: the input is not a leaf
    assert torch.equal(a.grad, expected) and torch.equal(b.grad, -expected)
    b.grad = None
    call(case, x, b, scale, weight, "mean", "sum")[0].backward()  # only the target needs a gradient: two passes
    assert torch.equal(b.grad, -expected)


def test_double_backward_is_still_refused():
    x, y, scale, _ = inputs((2, 3), DTYPES["float64"], seed=9)
    a = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(OPS.hellinger_loss(a, y, scale.double(), None, "mean", "mean")[0], a,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        g.sum().backward()


def test_which_operator_each_path_runs():
    """One pass only where autograd needs the input's gradient in eager CPU mode; forward-only under no_grad, for
    influence weights and for a target-only gradient; two operators in a compiled graph."""
    x, y, scale, _ = inputs((4, 3, 5, 5), DTYPES["float32"], seed=10)
    a = x.clone().requires_grad_()
    # (the profiler records the operator and, inside it, the one its autograd kernel calls)
    assert operators_run(lambda: rd.hellinger_loss(a, y).backward()) == {"hellinger_loss", "hellinger_loss_with_grad"}
    with torch.no_grad():
        assert operators_run(lambda: rd.hellinger_loss(a, y)) == {"hellinger_loss"}
    assert operators_run(lambda: rd.influence_weights(a, y, divergence="hellinger")) == {"hellinger_loss"}
    b = y.clone().requires_grad_()
    assert operators_run(lambda: rd.hellinger_loss(x, b).backward()) == {"hellinger_loss", "hellinger_loss_backward"}

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    compiled = torch.compile(lambda u, v: rd.hellinger_loss(u, v), backend="aot_eager", fullgraph=True)
    c = x.clone().requires_grad_()
    compiled(c, y).backward()
    torch.testing.assert_close(c.grad, two_pass_grad(case_for("hellinger", 4), x, y, torch.ones(4), None, "mean",
                                                     torch.tensor(1.0)))
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified  # the graphs AOTAutograd hands the backend

    def capture(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    torch._dynamo.reset()
    torch.compile(lambda u, v: rd.hellinger_loss(u, v), backend=capture, fullgraph=True)(x.clone().requires_grad_(),
                                                                                        y).backward()
    joined = "\n".join(graphs)
    assert "hellinger_loss_backward" in joined and "with_grad" not in joined


def test_with_grad_refuses_inputs_that_require_grad():
    x, y, scale, _ = inputs((2, 3), DTYPES["float32"], seed=11)
    with pytest.raises(RuntimeError, match="hellinger_loss_with_grad: input and target must not require grad"):
        OPS.hellinger_loss_with_grad(x.requires_grad_(), y, scale, None, "mean", "mean")


@pytest.mark.parametrize("case_id", ["hellinger", "pseudo_huber-huber", "clipped-element"])
def test_opcheck_with_grad(case_id):
    x, y, scale, weight = make_inputs((3, 2, 5), seed=12, dtype=torch.float32)
    params = tuple(p.float() if isinstance(p, torch.Tensor) else p for p in case_for(case_id, 3).params)
    op = getattr(OPS, case_for(case_id, 3).op + "_with_grad").default
    for reduction, w in (("mean", weight.float()), ("none", None)):
        torch.library.opcheck(op, (x, y, scale.float(), w, "mean", reduction, *params),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_meta_with_grad_checks_arguments():
    x = torch.empty(3, 4, device="meta")
    loss, penalty, influence, grad = OPS.ned_loss_with_grad(x, x, torch.ones(3, device="meta"), None, "mean", "none")
    assert grad.shape == x.shape and loss.shape == (3,)
    with pytest.raises(ValueError, match="scale must have one value per sample"):
        OPS.ned_loss_with_grad(x, x, torch.ones(2, device="meta"), None, "mean", "none")


def test_torchscript_and_jit_trace_take_the_one_pass_path():
    """A scripted or traced function calls the operator, whose autograd kernel picks the path at run time: the
    gradient is bitwise the eager one."""
    x, y, scale, _ = inputs((4, 3, 6, 6), DTYPES["float32"], seed=13)
    expected = two_pass_grad(case_for("ned", 4), x, y, scale, None, "mean", torch.tensor(1.0))

    def loss(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.ops.robust_diffusion.ned_loss(u, v, s, None, "mean", "mean")[0]

    for fn in (torch.jit.script(loss), torch.jit.trace(loss, (x, y, scale))):
        a = x.clone().requires_grad_()
        assert "ned_loss_with_grad" in str(operators_run(lambda: fn(a, y, scale).backward()))
        assert torch.equal(a.grad, expected)


def test_the_one_pass_path_can_be_turned_off():
    x, y, scale, _ = inputs((4, 3, 5, 5), DTYPES["bfloat16"], seed=14)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with rd.ops.cpu_one_pass(False):
        assert operators_run(lambda: rd.ned_loss(a, y).backward()) == {"ned_loss", "ned_loss_backward"}
    assert operators_run(lambda: rd.ned_loss(b, y).backward()) == {"ned_loss", "ned_loss_with_grad"}
    assert torch.equal(a.grad, b.grad)
    with pytest.raises(KeyError), rd.ops.cpu_one_pass(False):
        raise KeyError  # restored however the block ends
    assert OPS._set_cpu_one_pass(True) is True
