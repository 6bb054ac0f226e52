"""CUDA kernels: parity with the CPU kernels for every operator, dtype and reduction, opcheck, torch.compile
(including CUDA graphs) and bitwise determinism. Skipped without a GPU and a CUDA build."""

import pytest
import torch

import robust_diffusion as rd
from loss_reference import CASE_IDS, loss_cases

OPS = torch.ops.robust_diffusion

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("robust_diffusion::kl_loss", "CUDA")),
    reason="needs a GPU and robust_diffusion built with its CUDA kernels")

# Shapes that exercise the 2-D grid: one segment per sample, many segments of a long sample, odd D
# (misaligned sample starts: scalar head and tail paths), B = 1, and a batch larger than the grid.
SHAPES = [(1, 7), (5, 3, 11, 13), (3, 40001), (2, 16, 128, 128), (700, 2)]
# CPU (float64 accumulation across chunks) vs CUDA (float32 per block, float64 across blocks).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def case_for(case_id, batch):
    return next(c for c in loss_cases(batch, torch.Generator().manual_seed(0)) if c.id == case_id)


def run(case, x, y, scale, weight, dim_reduction, reduction):
    params = tuple(p.to(x.device, torch.float32) if isinstance(p, torch.Tensor) else p for p in case.params)
    x = x.detach().clone().requires_grad_()
    loss, penalty, influence = getattr(OPS, case.op)(x, y, scale, weight, dim_reduction, reduction, *params)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), penalty, influence, x.grad


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_matches_cpu(case_id, dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    y = torch.randn(shape, generator=g).to(dtype)
    scale = torch.rand(shape[0], generator=g) * 2
    weight = torch.rand(shape[0], generator=g) + 0.5
    case = case_for(case_id, shape[0])
    for reduction in ("mean", "sum", "none"):
        for dim_reduction in ("mean", "sum"):
            s = scale if dim_reduction == "mean" else scale / x[0].numel()
            cpu = run(case, x, y, s, weight, dim_reduction, reduction)
            gpu = run(case, x.cuda(), y.cuda(), s.cuda(), weight.cuda(), dim_reduction, reduction)
            for a, b in zip(cpu, gpu):
                torch.testing.assert_close(b.cpu().double(), a.double(), rtol=TOL[dtype], atol=TOL[dtype])


def test_cuda_low_precision_input_with_float32_target():
    x = torch.randn(4, 3, 33, 31, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(4, 3, 33, 31, device="cuda")
    scale = torch.ones(4, device="cuda")
    gpu = run(case_for("ned", 4), x, y, scale, None, "mean", "none")
    cpu = run(case_for("ned", 4), x.cpu(), y.cpu(), scale.cpu(), None, "mean", "none")
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=1e-4, atol=1e-5)


def test_cuda_misaligned_views():
    base = torch.randn(6, 1001, device="cuda")
    target = torch.randn(6, 1001, device="cuda")
    x, y = base[:, 1:], target[:, :-1]  # storage offsets that break 16-byte alignment, differently
    scale = torch.ones(6, device="cuda")
    gpu = run(case_for("hellinger", 6), x, y, scale, None, "mean", "none")
    cpu = run(case_for("hellinger", 6), x.cpu(), y.cpu(), scale.cpu(), None, "mean", "none")
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_cuda_opcheck(case_id):
    case = case_for(case_id, 3)
    params = tuple(p.cuda().float() if isinstance(p, torch.Tensor) else p for p in case.params)
    x = torch.randn(3, 2, 5, device="cuda")
    y = torch.randn(3, 2, 5, device="cuda")
    scale = torch.rand(3, device="cuda")
    for requires_grad in (False, True):
        torch.library.opcheck(getattr(OPS, case.op).default,
                              (x.clone().requires_grad_(requires_grad), y, scale, None, "mean", "mean", *params))


def test_cuda_bitwise_deterministic():
    x = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    scale = torch.rand(8, device="cuda")
    first = run(case_for("ned", 8), x, y, scale, None, "sum", "mean")
    for _ in range(3):
        again = run(case_for("ned", 8), x, y, scale, None, "sum", "mean")
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_torch_compile(mode):
    torch._dynamo.reset()
    schedule = rd.NoiseSchedule.linear()

    def step(x, y, t):
        return rd.hellinger_loss(x * 1.0, y, t, schedule=schedule, scale="vlb", dim_reduction="sum")

    compiled = torch.compile(step, mode=mode, fullgraph=True, dynamic=mode == "default")
    for _ in range(3):  # CUDA graphs record on the first calls, replay after
        x = torch.randn(6, 3, 16, 16, device="cuda", requires_grad=True)
        y = torch.randn(6, 3, 16, 16, device="cuda")
        t = torch.randint(0, 1000, (6,), device="cuda")
        (ge,) = torch.autograd.grad(step(x, y, t), x)
        out = compiled(x, y, t)
        (gc,) = torch.autograd.grad(out, x)
        torch.testing.assert_close(out, step(x, y, t))
        torch.testing.assert_close(gc, ge)


def test_cuda_robust_loss_module():
    module = rd.RobustDiffusionLoss("ned", weighting="min_snr").cuda()
    x = torch.randn(16, 1, 8, 8, device="cuda", requires_grad=True)
    y = torch.randn(16, 1, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (16,), device="cuda")
    module(x, y, t).backward()
    assert module.adaptive_scale.bucket_penalty.is_cuda and torch.isfinite(x.grad).all()


def test_cuda_adaptive_scale_follows_the_cpu_and_never_syncs():
    """RobustDiffusionLoss's state on CUDA (bucket_statistic, adaptive_scale_update) tracks the CPU module's
    through a skipped first step, seeding, EMA steps and a later skipped step, the losses too (the batch after
    the skipped first step is scored against its own medians, as on the CPU), and a training call plus step()
    never waits for the GPU."""
    cpu = rd.RobustDiffusionLoss("ned", weighting="min_snr", update="step")
    gpu = rd.RobustDiffusionLoss("ned", weighting="min_snr", update="step").cuda()
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randn(48, 1, 8, 8, generator=g)
        t = torch.randint(0, 1000, (48,), generator=g)
        ok = step not in (0, 3)
        expected = cpu(x, y, t)
        cpu.step(torch.tensor(ok))
        args, ok_gpu = (x.cuda().requires_grad_(), y.cuda(), t.cuda()), torch.tensor(ok, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = gpu(*args)
            loss.backward()
            gpu.step(ok_gpu)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(gpu.adaptive_scale.bucket_penalty.cpu(), cpu.adaptive_scale.bucket_penalty, rtol=1e-5, atol=0)
        for name in ("initialized", "skipped_updates", "limited_updates"):
            assert torch.equal(getattr(gpu.adaptive_scale, name).cpu(), getattr(cpu.adaptive_scale, name)), name
    assert int(gpu.adaptive_scale.skipped_updates) == 2 and gpu.adaptive_scale.seeded_on_host  # the host flag followed, no extra pass once seeded


@pytest.mark.parametrize("argument", ["target", "scale", "weight", "c"])
@pytest.mark.parametrize("input_device, other_device", [("cpu", "cuda"), ("cuda", "cpu")])
def test_cuda_cpu_device_mismatch_names_the_argument(argument, input_device, other_device):
    """One argument on the other device: a clear error naming it, from the CPU or the CUDA kernel, with or
    without autograd."""
    case = case_for("pseudo_huber-huber", 3)
    args = {"target": torch.randn(3, 4), "scale": torch.rand(3), "weight": torch.rand(3) + 0.5,
            "c": case.params[0].float()}
    args = {name: value.to(other_device if name == argument else input_device) for name, value in args.items()}
    x = torch.randn(3, 4, device=input_device)
    for requires_grad in (False, True):
        with pytest.raises(ValueError, match=rf"pseudo_huber_loss: {argument} must be on input's device "
                                             rf"\({input_device}(:0)?\), got {other_device}"):
            OPS.pseudo_huber_loss(x.clone().requires_grad_(requires_grad), args["target"], args["scale"],
                                  args["weight"], "mean", "mean", args["c"], "huber")
    if argument == "target":  # through the Python API too
        with pytest.raises(ValueError, match=r"hellinger_loss: target must be on input's device"):
            rd.hellinger_loss(x, args["target"])


def test_cuda_keeps_two_passes():
    """On CUDA autograd runs the forward and the backward operator (a one-pass gradient would cost a host sync
    per step; docs/DESIGN.md, Kernels), and <loss>_with_grad, registered for every backend, is those two."""
    x = torch.randn(4, 3, 9, 9, device="cuda")
    y = torch.randn(4, 3, 9, 9, device="cuda")
    scale = torch.rand(4, device="cuda")
    a = x.clone().requires_grad_()
    with torch.autograd.profiler.profile() as prof:
        OPS.ned_loss(a, y, scale, None, "mean", "mean")[0].backward()
    names = {e.name for e in prof.function_events if e.name.startswith("robust_diffusion::")}
    assert names == {"robust_diffusion::ned_loss", "robust_diffusion::ned_loss_backward"}
    loss, penalty, influence, grad = OPS.ned_loss_with_grad(x, y, scale, None, "mean", "mean")
    assert torch.equal(grad, a.grad) and torch.equal(loss, OPS.ned_loss(x, y, scale, None, "mean", "mean")[0])
