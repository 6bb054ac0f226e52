"""Fault injection: the promises of "nothing fails silently" (docs/DESIGN.md, "Failure behaviour"), one test each.

1-5   The adaptive scale's running state: no overflowing, non-finite or zero batch enters it; seeding never
      freezes a bucket, and a batch after an unseeding first one is scored like a first batch; it stays float32
      whatever the module's dtype; one absurd batch is forgotten within a few clean ones.
6     RobustDiffusionLoss checks t (range, dtype, length, device) with messages that name it.
7     The Meta kernels run the real kernels' checks: meta tensors, FakeTensorMode, torch.compile and
      torch.export reject what eager rejects, with the same message.
8-9   Functional, schedule and risk arguments: a one-line error naming the argument, or the right value.
10    The training CLI: one-line usage errors instead of tracebacks or silent misconfiguration.
11    Files a user opens (checkpoints, caches) run no code: a pickle is refused unopened; a state file keeps every
      value and names its kind and format version.
12    The mistakes a new user makes first (a model output without .sample, t as a list or of the wrong integer
      dtype, diffusers' flow timesteps for sigmas, a schedule for a count, an empty batch, a schedule with no
      noise) get one line that names the argument and the fix.
AMP   An fp16 autocast loop with GradScaler whose forward pass overflows at steps 1 and 50 trains as well as
      without, and the skipped steps leave no trace in the state.
Kill  A run with the adaptive scale, a poisoning batch and a SIGKILL resumes to exactly the uninterrupted run.
"""

import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import robust_diffusion as rd
from conftest import subprocess_pythonpath
from robust_diffusion.training import experiment, train_command
from robust_diffusion.training.data import fashion_mnist_root
from robust_diffusion.training.trainer_checkpoint import read_checkpoint

OPS = torch.ops.robust_diffusion
T = torch.arange(32) * 31  # one timestep per sample, every bucket of the default 10 hit
HAS_FASHION_MNIST = (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file()

pytestmark = pytest.mark.usefixtures("one_thread")


def clean_batch(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 16, generator=g) * scale, torch.zeros(32, 16)


def trained(module, seeds):
    for seed in seeds:
        module(*clean_batch(seed), T)
    return module


# --------------------------------------------------------------------------- 1-5: the adaptive state
@pytest.mark.parametrize("value", [1e20, math.inf, math.nan])
def test_1_a_non_finite_batch_after_the_first_leaves_the_state_alone(value):
    module = trained(rd.RobustDiffusionLoss("hellinger"), [0])
    before = module.adaptive_scale.bucket_penalty.clone()
    loss = module(torch.full((32, 16), value), torch.zeros(32, 16), T)  # 1e20 squared overflows float32 to inf
    assert torch.equal(module.adaptive_scale.bucket_penalty, before)
    assert int(module.adaptive_scale.skipped_updates) == 1
    reference = trained(rd.RobustDiffusionLoss("hellinger"), [0])
    x, y = clean_batch(1)
    torch.testing.assert_close(module(x, y, T), reference(x, y, T))  # the next clean batch trains as if unseen
    assert loss.dim() == 0


def test_1_one_absurd_but_finite_batch_is_forgotten_within_a_few_clean_ones():
    """Residuals of 1e18 give finite penalties of 1e36: the update is clamped to 2x the bucket (1.1x after the
    EMA), counted, and ten clean batches bring every bucket back within 5% of a module that never saw it."""
    module = trained(rd.RobustDiffusionLoss("hellinger"), range(5))
    reference = trained(rd.RobustDiffusionLoss("hellinger"), range(5))
    limited = int(module.adaptive_scale.limited_updates)
    module(*clean_batch(99, scale=1e18), T)
    assert int(module.adaptive_scale.limited_updates) == limited + module.num_buckets and int(module.adaptive_scale.skipped_updates) == 0
    assert (module.adaptive_scale.bucket_penalty <= 1.1 * reference.adaptive_scale.bucket_penalty * (1 + 1e-6)).all()
    for seed in range(5, 15):
        module(*clean_batch(seed), T)
        reference(*clean_batch(seed), T)
    torch.testing.assert_close(module.adaptive_scale.bucket_penalty, reference.adaptive_scale.bucket_penalty, rtol=0.05, atol=0)


def test_2_a_non_finite_first_batch_never_freezes_a_bucket():
    module = rd.RobustDiffusionLoss("hellinger")
    x = torch.randn(32, 16)
    x[:3, 0] = math.inf
    module(x, torch.zeros(32, 16), T)
    assert torch.isfinite(module.adaptive_scale.bucket_penalty).all() and not bool(module.adaptive_scale.initialized)
    assert int(module.adaptive_scale.skipped_updates) == 1
    reference = rd.RobustDiffusionLoss("hellinger")
    for seed in range(3):
        module(*clean_batch(seed), T)
        reference(*clean_batch(seed), T)
    torch.testing.assert_close(module.adaptive_scale.bucket_penalty, reference.adaptive_scale.bucket_penalty)


def test_3_an_all_nan_first_batch_does_not_break_later_calls():
    module = rd.RobustDiffusionLoss("hellinger")
    module(torch.full((32, 16), math.nan), torch.zeros(32, 16), T)
    x, y = clean_batch(0)
    loss = module(x, y, T)  # used to raise "scale must be non-negative" although the user passed no scale
    assert torch.isfinite(loss) and bool(module.adaptive_scale.initialized)


def test_4_a_zero_residual_first_call_does_not_seed_the_state():
    module = rd.RobustDiffusionLoss("kl")
    x = torch.randn(32, 16)
    module(x, x, T)
    assert torch.equal(module.adaptive_scale.bucket_penalty, torch.ones(10)) and int(module.adaptive_scale.skipped_updates) == 1
    assert module(*clean_batch(1), T) < 2.0  # was 1.8e12; this batch seeds the state
    reference = rd.RobustDiffusionLoss("kl")
    reference(*clean_batch(1), T)
    x, y = clean_batch(2)
    torch.testing.assert_close(module(x, y, T), reference(x, y, T))
    hellinger = rd.RobustDiffusionLoss("hellinger")
    x = torch.randn(32, 16)
    hellinger(x, x, T)
    hellinger(*clean_batch(2), T)
    assert hellinger.last_influence.min() > 0.1  # was 0: the 1e-12 floor made every later sample an outlier


def test_4_a_fresh_module_in_eval_mode_does_not_seed_itself():
    module = rd.RobustDiffusionLoss("ned").eval()
    x, y = clean_batch(0)
    loss = module(x, y, T)
    assert not bool(module.adaptive_scale.initialized) and torch.equal(module.adaptive_scale.bucket_penalty, torch.ones(10))
    training = rd.RobustDiffusionLoss("ned")
    torch.testing.assert_close(loss, training(x, y, T))  # the same provisional scale, from the batch itself


@pytest.mark.parametrize("first", ["nan", "zero residual", "skipped step", "skipped step, host bool"])
def test_4_the_batch_after_an_unseeding_first_one_is_scored_against_its_own_medians(first):
    """A first batch that does not seed the state leaves the next batch where a fresh module's first batch is:
    scored against its own medians, same loss and gradient (it was scored at the initial scale of 1)."""
    update = "step" if first.startswith("skipped") else "forward"
    module = rd.RobustDiffusionLoss("hellinger", update=update)
    x0 = {"nan": torch.full((32, 16), math.nan), "zero residual": torch.zeros(32, 16)}.get(first, clean_batch(0)[0])
    module(x0, torch.zeros(32, 16), T)
    if update == "step":
        module.step(False if first.endswith("bool") else torch.tensor(False))
    assert not bool(module.adaptive_scale.initialized) and not module.adaptive_scale.seeded_on_host
    fresh = rd.RobustDiffusionLoss("hellinger", update=update)
    x, y = clean_batch(1, scale=3.0)
    grads = []
    for m in (module, fresh):
        xg = x.clone().requires_grad_()
        loss = m(xg, y, T)
        loss.backward()
        m.step()
        grads.append((loss.detach(), xg.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    at_initial_scale = rd.RobustDiffusionLoss("hellinger").eval()
    at_initial_scale.load_state_dict({**at_initial_scale.state_dict(), "adaptive_scale.initialized": torch.tensor(True)})
    assert abs(float(grads[0][0]) - float(at_initial_scale(x, y, T))) > 0.05  # what it was: not vacuous
    assert module.adaptive_scale.seeded_on_host and torch.equal(module.adaptive_scale.bucket_penalty, fresh.adaptive_scale.bucket_penalty)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_5_dtype_casts_keep_the_state_and_tables_float32(cast):
    module = getattr(rd.RobustDiffusionLoss("hellinger", weighting="min_snr"), cast)()
    assert all(buffer.dtype in (torch.float32, torch.int64, torch.bool) for buffer in module.buffers())
    reference = rd.RobustDiffusionLoss("hellinger", weighting="min_snr")
    x = (0.01 * torch.randn(32, 16)).requires_grad_()
    y = torch.zeros(32, 16)
    loss = module(x, y, T)
    torch.testing.assert_close(loss, reference(x.detach(), y, T))  # fp16 buffers gave 4.0 instead of 0.89
    loss.backward()
    assert torch.isfinite(x.grad).all() and module.last_influence.min() > 0.2  # fp16: 0 and NaN gradients
    saturated = getattr(rd.RobustDiffusionLoss("ned", weighting="p2", weighting_params={"k": 1e-6, "gamma": 10}),
                        cast)()
    assert torch.isfinite(saturated.timestep_weight).all()  # float32 max, which fp16 would make inf


def test_5_load_state_dict_refuses_a_poisoned_scale():
    state = trained(rd.RobustDiffusionLoss("ned"), [0]).state_dict()
    for bad in (math.inf, math.nan, 0.0, -1.0):
        key = "adaptive_scale.bucket_penalty"
        poisoned = {**state, key: state[key].clone().index_fill_(0, torch.tensor([3]), bad)}
        with pytest.raises(ValueError, match=r"bucket_penalty must be finite and at least 1e-12"):
            rd.RobustDiffusionLoss("ned").load_state_dict(poisoned)


def test_step_mode_commits_after_the_optimizer_step_and_drops_a_skipped_one():
    eager = rd.RobustDiffusionLoss("hellinger")
    staged = rd.RobustDiffusionLoss("hellinger", update="step")
    for seed in range(3):
        eager(*clean_batch(seed), T)
        staged(*clean_batch(seed), T)
        staged.step(torch.tensor(True))
    assert torch.equal(eager.adaptive_scale.bucket_penalty, staged.adaptive_scale.bucket_penalty)
    before = staged.adaptive_scale.bucket_penalty.clone()
    staged(*clean_batch(7, scale=3.0), T)
    staged.step(torch.tensor(False))  # e.g. torch.isfinite(grad_norm) after a GradScaler overflow
    assert torch.equal(staged.adaptive_scale.bucket_penalty, before) and int(staged.adaptive_scale.skipped_updates) == 1
    # Gradient accumulation: two forward passes, one step, the mean of their bucket medians.
    a = rd.RobustDiffusionLoss("kl", num_buckets=1, momentum=0.0, update="step")
    a(torch.ones(4, 8), torch.zeros(4, 8), torch.full((4,), 3))
    a(torch.full((4, 8), 1.5), torch.zeros(4, 8), torch.full((4,), 3))
    assert not bool(a.adaptive_scale.initialized)
    a.step()
    torch.testing.assert_close(a.adaptive_scale.bucket_penalty, torch.tensor([(1.0 + 2.25) / 2]))
    # A Python bool is taken as it is; the gradient norm itself (a float, where its finiteness was meant) is refused.
    staged(*clean_batch(8, scale=3.0), T)
    staged.step(False)
    assert torch.equal(staged.adaptive_scale.bucket_penalty, before) and int(staged.adaptive_scale.skipped_updates) == 2
    for bad, error, message in ((torch.tensor(float("nan")), ValueError, "got a torch.float32 tensor of shape ()"),
                                (torch.tensor([True, True]), ValueError, "got a torch.bool tensor of shape (2,)"),
                                ("yes", TypeError, "got str")):
        staged(*clean_batch(9), T)
        with pytest.raises(error, match=r"RobustDiffusionLoss.step: ok must be a bool or a one-element bool tensor "
                                        r"\(e.g. torch.isfinite\(grad_norm\)\), " + re.escape(message)):
            staged.step(bad)
    staged.step(True)
    assert not torch.equal(staged.adaptive_scale.bucket_penalty, before)  # what was staged before the refused calls went in
    assert int(staged.adaptive_scale.skipped_updates) == 2


# --------------------------------------------------------------------------- 6: t
@pytest.mark.parametrize("bad_t, error, message", [
    (torch.full((32,), -1), ValueError, r"RobustDiffusionLoss: t must lie in \[0, 1000\).* got values in \[-1, -1\]"),
    (torch.full((32,), 1000), ValueError, r"RobustDiffusionLoss: t must lie in \[0, 1000\)"),
    (T.float(), TypeError, r"RobustDiffusionLoss: t must hold integer timesteps"),
    (T.bool(), TypeError, r"RobustDiffusionLoss: t must hold integer timesteps"),
    (T[:5], ValueError, r"RobustDiffusionLoss: t must be a 1-D tensor with one timestep per sample"),
    (T.to("meta"), ValueError, r"RobustDiffusionLoss: t must be on input's device \(cpu\), got meta"),
], ids=["negative", "T", "float", "bool", "length", "device"])
def test_6_the_module_validates_t(bad_t, error, message):
    with pytest.raises(error, match=message):
        rd.RobustDiffusionLoss("hellinger")(*clean_batch(0), bad_t)


def test_6_a_module_on_another_device_says_to_move_it():
    x, y = clean_batch(0)
    with pytest.raises(ValueError, match=r"the module is on cpu and input on meta: move the module with \.to\('meta'\)"):
        rd.RobustDiffusionLoss("hellinger")(x.to("meta"), y.to("meta"), T.to("meta"))


def test_6_compiled_module_asserts_the_range_of_t():
    module = rd.RobustDiffusionLoss("hellinger", scale=1.0)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x, y = clean_batch(0)
    compiled(x, y, T)
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1000\)"):
        compiled(x, y, T - 1)  # a negative index would otherwise wrap around silently


# --------------------------------------------------------------------------- 7: the same checks on every path
def _m(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


TRACED_BAD_CALLS = [
    ("reduction", lambda: (OPS.kl_loss, (_m(4, 3), _m(4, 3), _m(4), None, "mean", "avg")),
     r"kl_loss: reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    ("dim_reduction", lambda: (OPS.ned_loss, (_m(4, 3), _m(4, 3), _m(4), None, "max", "mean")),
     r"ned_loss: dim_reduction must be 'sum' or 'mean', got 'max'"),
    ("target shape", lambda: (OPS.hellinger_loss, (_m(4, 3), _m(4, 2), _m(4), None, "mean", "mean")),
     r"hellinger_loss: target must have the shape of input \[4, 3\], got \[4, 2\]"),
    ("scale length", lambda: (OPS.hellinger_loss, (_m(4, 3), _m(4, 3), _m(3), None, "mean", "mean")),
     r"hellinger_loss: scale must have one value per sample, shape \[4\], got shape \[3\]"),
    ("int64 input", lambda: (OPS.kl_loss, (_m(4, 3, dtype=torch.int64), _m(4, 3), _m(4), None, "mean", "mean")),
     r"kl_loss: input must be float32, float64, float16 or bfloat16, got Long"),
    ("alpha", lambda: (OPS.alpha_loss, (_m(4, 3), _m(4, 3), _m(4), None, "mean", "mean", 2.0)),
     r"alpha_loss: alpha must lie in the open interval \(0, 1\), got 2"),
    ("empty batch", lambda: (OPS.tv_loss, (_m(0, 3), _m(0, 3), _m(0), None, "mean", "mean")),
     r"tv_loss: input has an empty batch"),
    ("0-d input", lambda: (OPS.kl_loss, (_m(), _m(), _m(1), None, "mean", "mean")),
     r"kl_loss: input must have a leading batch dimension, got a 0-dim tensor"),
    ("backward influence", lambda: (OPS.js_loss_backward, (_m(), _m(4, 3), _m(4, 3), _m(4), None, _m(2), "mean",
                                                           "mean")),
     r"js_loss: influence must have shape \[4\], got \[2\]"),
    ("statistic bucket dtype", lambda: (OPS.bucket_statistic, (_m(4), _m(4), 3, 1e-12)),
     r"bucket_statistic: bucket must be int32 or int64, got Float"),
    ("update statistic shape", lambda: (OPS.adaptive_scale_update, (_m(3), _m(dtype=torch.bool),
                                                                    _m(dtype=torch.int64), _m(dtype=torch.int64),
                                                                    _m(6), None, 0.9, 2.0, 1e-12)),
     r"adaptive_scale_update: statistic must be bucket_statistic's \[2 \* 3 \+ 1\] for 3 buckets, got shape \[6\]"),
    ("risk prediction_type", lambda: (OPS.risk_noising, (_m(4, 3), _m(4), _m(4, 3), None, _m(4), "foo", "gaussian")),
     r"risk_noising: prediction_type must be 'epsilon', 'score', 'sample' or 'v_prediction', got 'foo'"),
    ("risk shape", lambda: (OPS.risk_noising, (_m(4, 3), _m(3), _m(4, 3), None, _m(4), "epsilon", "gaussian")),
     r"risk_noising: risk must have the sample's shape \[4, 3\]"),
]


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("make, message", [(m, msg) for _, m, msg in TRACED_BAD_CALLS],
                         ids=[name for name, _, _ in TRACED_BAD_CALLS])
@pytest.mark.parametrize("path", ["meta", "fake", "compile", "export"])
def test_7_every_path_rejects_what_eager_rejects_with_the_same_message(make, message, path):
    """``message`` is what eager mode says (tests/test_losses.py, BAD_CALLS); each path must say it while
    tracing, before anything runs."""
    op, args = make()
    if path == "meta":
        with pytest.raises((ValueError, TypeError), match=message):
            op(*_to(args, "meta"))
    elif path == "fake":
        with FakeTensorMode() as mode, pytest.raises((ValueError, TypeError), match=message):
            op(*tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    elif path == "compile":
        torch._dynamo.reset()
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def call(*values):
            full = list(args)
            for i, v in zip(tensors, values):
                full[i] = v
            return op(*full)

        # While tracing, dynamo wraps the Meta kernel's error in a TorchRuntimeError; a graph that traced and
        # then failed when run would raise the bare ValueError / TypeError instead.
        with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=message):
            torch.compile(call, backend="eager", fullgraph=True)(*(args[i] for i in tensors))
    else:
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        class Call(torch.nn.Module):
            def forward(self, *values):
                full = list(args)
                for i, v in zip(tensors, values):
                    full[i] = v
                return op(*full)

        with pytest.raises((ValueError, TypeError), match=message):
            torch.export.export(Call(), tuple(args[i] for i in tensors))


# --------------------------------------------------------------------------- 8: functional arguments
FUNCTIONAL_BAD_CALLS = [
    (lambda x, t: rd.hellinger_loss(x, x, scale=math.inf), ValueError,
     r"hellinger_loss: scale must be non-negative and finite, got inf"),
    (lambda x, t: rd.ned_loss(x, x, scale=torch.full((4,), math.inf)), ValueError,
     r"ned_loss: scale must be non-negative and finite"),
    (lambda x, t: rd.hellinger_loss(x, x, weight=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError,
     r"hellinger_loss: weight must be non-negative and finite, got values in \[-1, 1\]"),
    (lambda x, t: rd.kl_loss(x, x, weight=-2.0), ValueError, r"kl_loss: weight must be non-negative and finite"),
    (lambda x, t: rd.hellinger_loss(x, x, t.to("meta")), ValueError,
     r"hellinger_loss: t must be on input's device \(cpu\), got meta"),
    (lambda x, t: rd.hellinger_loss(x.to("meta"), x.to("meta"), t, scale="vlb"), ValueError,
     r"hellinger_loss: t must be on input's device \(meta\), got cpu"),
    (lambda x, t: rd.hellinger_loss(x, x, scale=[1.0, 2.0]), TypeError,
     r"hellinger_loss: scale must be a float, a per-sample tensor or 'vlb', got list"),
    (lambda x, t: rd.alpha_loss(x, x, alpha="half"), TypeError, r"alpha_loss: alpha must be a float in \(0, 1\), got str"),
    (lambda x, t: rd.huber_loss(x, x, delta=None), TypeError, r"huber_loss: delta must be a float, got NoneType"),
    (lambda x, t: rd.clipped_mse_loss(x, x, tau="1"), TypeError, r"clipped_mse_loss: tau must be a float, got str"),
    (lambda x, t: rd.pseudo_huber_loss(x, x, c=torch.full((4,), math.inf)), ValueError,
     r"pseudo_huber_loss: c must be positive and finite"),
]


@pytest.mark.parametrize("bad_call, error, message", FUNCTIONAL_BAD_CALLS, ids=[m for _, _, m in FUNCTIONAL_BAD_CALLS])
def test_8_functional_arguments(bad_call, error, message):
    with pytest.raises(error, match=message):
        bad_call(torch.randn(4, 3), torch.tensor([0, 10, 500, 999]))


# --------------------------------------------------------------------------- 9: schedules and risk
def test_9_a_zero_first_beta_gives_infinite_snr_not_minus_infinity():
    schedule = rd.NoiseSchedule.linear(10, 0.0, 0.02)
    assert schedule.snr[0] == math.inf and schedule.log_snr()[0] == math.inf
    assert schedule.one_minus_alphas_cumprod[0] == 0 and not math.copysign(1.0, schedule.one_minus_alphas_cumprod[0]) < 0


@pytest.mark.parametrize("call, message", [
    (lambda: rd.risk_noising(torch.randn(4, 3), math.inf, torch.full((4,), 500)),
     r"risk_noising: risk must be non-negative and finite .*got inf"),
    (lambda: rd.risk_noising(torch.randn(4, 3), torch.tensor([0.1, math.inf, 0.0, 0.2]), torch.full((4,), 500)),
     r"risk_noising: risk must be non-negative and finite .*got inf"),
    (lambda: rd.NoiseSchedule.linear(1, zero_terminal_snr=True), r"zero_terminal_snr needs at least 2 timesteps"),
    (lambda: rd.NoiseSchedule.linear().sample_timesteps(-1), r"sample_timesteps: batch_size must be a non-negative"),
    (lambda: rd.NoiseSchedule.linear().sample_timesteps(2.5), r"sample_timesteps: batch_size must be a non-negative"),
], ids=["risk inf", "risk inf element", "zero terminal snr T=1", "negative batch", "float batch"])
def test_9_schedule_and_risk_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- 10: the CLI
needs_fashion_mnist = pytest.mark.skipif(not HAS_FASHION_MNIST, reason="dataset-fashion-mnist is not installed")


@pytest.mark.parametrize("argv, message", [
    (["--grad-clip", "-1"], r"argument --grad-clip: must be a non-negative number, got '-1'"),
    (["--base-channels", "-4"], r"argument --base-channels: must be a positive integer, got '-4'"),
    (["--temperature", "0"], r"argument --temperature: must be a positive number, got '0'"),
    (["--steps", "0"], r"argument --steps: must be a positive integer"),
    (["--lr", "nan"], r"argument --lr: must be a positive number"),
    (["--loss", "kl+risk_free", "--kind", "noise"], r"\+risk_free needs --kind gaussian"),
    (["--batch-size", "128"], r"the dataset has 64 samples, fewer than one global batch of 128"),
    (["--mixed-precision", "fp16"], r"mixed_precision='fp16' needs a CUDA device"),
], ids=["grad-clip", "base-channels", "temperature", "steps", "lr", "risk_free kind", "batch", "fp16 cpu"])
@needs_fashion_mnist
def test_10_cli_misconfiguration_is_a_one_line_usage_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train_command.main(["--out", str(tmp_path), "--model", "micro", "--num-train", "64", "--batch-size", "8",
                  "--steps", "1", "--no-progress", "--device", "cpu"] + argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m robust_diffusion.train: error: ")
    assert __import__("re").search(message, error), error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@needs_fashion_mnist
def test_10_cli_cuda_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_command.main(["--out", str(tmp_path), "--model", "micro", "--num-train", "64", "--steps", "1", "--device", "cuda"])
    assert "no CUDA device is available here" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("content, reason", [
    (b"garbage", "it is not a safetensors file"), (b"", "it is not a safetensors file (0 bytes)"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"truncated", "it is not a safetensors file, or it is truncated"),
    (b"PK\x03\x04 a torch.save zip", "it is a pickle (torch.save) file")], ids=["text", "empty", "truncated", "pickle"])
@needs_fashion_mnist
def test_10_cli_resume_from_a_corrupted_checkpoint(tmp_path, capsys, content, reason):
    (tmp_path / "checkpoint.safetensors").write_bytes(content)
    with pytest.raises(SystemExit):
        train_command.main(["--out", str(tmp_path), "--model", "micro", "--num-train", "64", "--batch-size", "8",
                            "--steps", "1", "--no-progress", "--device", "cpu", "--resume"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot resume from {tmp_path / 'checkpoint.safetensors'}: {reason}" in error, error
    assert error.endswith("delete it or pass another --out"), error


# --------------------------------------------------------------------------- 11: files a user opens run no code
class _RunsCode:
    """A pickle payload: unpickling it runs ``open(marker, "w")``, as a malicious checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "classifier.safetensors"])
def test_11_a_pickled_file_is_refused_and_never_unpickled(tmp_path, name):
    """A checkpoint or classifier cache from someone else may be a pickle that runs code when loaded: it is
    refused in one line, and nothing in it is executed."""
    from robust_diffusion.training import metrics

    marker = tmp_path / "code_ran"
    path = tmp_path / name
    torch.save({"step": 1, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"it is a pickle \(torch.save\) file.* is not opened: unpickling can run "
                                         r"code") as error:
        if name.startswith("checkpoint"):
            read_checkpoint(path)
        else:
            metrics.train_classifier(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), cache_path=path)
    assert len(str(error.value).splitlines()) == 1 and not marker.exists()
    unpickled = tmp_path / "payload.pt"  # torch.load reads a .safetensors name with safetensors itself
    unpickled.write_bytes(path.read_bytes())
    torch.load(unpickled, weights_only=False)  # the payload is real: unpickling it runs it
    assert marker.exists()


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"], ids=["pickle protocol mark", "zip mark"])
def test_11_a_state_file_whose_header_length_begins_like_a_pickle_still_loads(tmp_path, first_bytes):
    """A safetensors file starts with its header's length: its first bytes can be anything, a pickle's or zip's
    marks included, and such a file is still read as what it is."""
    from robust_diffusion.training.checkpoint import load_state, save_state

    path = tmp_path / "state.safetensors"
    target = int.from_bytes(first_bytes, "little")
    modulus = 256 ** len(first_bytes)
    save_state({"pad": ""}, path, "test", 1)
    base = int.from_bytes(path.read_bytes()[:8], "little")
    for extra in range((target - base) % modulus, (target - base) % modulus + 16):  # the header is padded to 8
        save_state({"pad": "x" * extra}, path, "test", 1)
        if path.read_bytes()[:len(first_bytes)] == first_bytes:
            break
    assert path.read_bytes()[:len(first_bytes)] == first_bytes
    assert load_state(path, "test", 1)["pad"] == "x" * extra


def test_11_a_state_file_keeps_every_value_and_refuses_another_kind_or_version(tmp_path):
    import random

    import numpy as np

    from robust_diffusion.training.checkpoint import StateFileError, load_state, rng_state, save_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"rng": rng_state(torch.device("cpu")), "optimizer": optimizer.state_dict(), "nan": math.nan,
             "tuple": (1, 2.5, "x", None, True), "ints": {0: "zero", 7: [1, 2]}, "half": torch.ones(2).half()}
    path = tmp_path / "state.safetensors"
    save_state(state, path, "test state", 3)
    loaded = load_state(path, "test state", 3)
    assert loaded["tuple"] == (1, 2.5, "x", None, True) and loaded["ints"] == {0: "zero", 7: [1, 2]}
    assert math.isnan(loaded["nan"]) and loaded["half"].dtype == torch.float16
    assert loaded["rng"]["python"] == random.getstate() and torch.equal(loaded["rng"]["torch"], torch.get_rng_state())
    numpy_state = np.random.get_state()
    assert loaded["rng"]["numpy"][0] == numpy_state[0] and loaded["rng"]["numpy"][1].dtype == numpy_state[1].dtype
    assert np.array_equal(loaded["rng"]["numpy"][1], numpy_state[1])
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(loaded["optimizer"])
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for kind, version, reason in (("other state", 3, "it is a test state, not a other state"),
                                  ("test state", 4, "it is a test state of format version 3; this version of "
                                                    "robust_diffusion reads version 4")):
        with pytest.raises(StateFileError) as error:
            load_state(path, kind, version)
        assert error.value.reason == reason


# --------------------------------------------------------------------------- 12: what users get wrong first
class _ModelOutput:
    """What a diffusers model returns (UNet2DOutput): the prediction is its .sample."""

    def __init__(self, sample):
        self.sample = sample


_X = torch.randn(4, 1, 4, 4)
_T = torch.tensor([0, 10, 500, 999])
USER_MISTAKES = [
    (lambda: rd.RobustDiffusionLoss("ned")(_ModelOutput(_X), _X, _T), TypeError,
     r"^RobustDiffusionLoss: input is a _ModelOutput \(a diffusers model output\): pass its .sample$"),
    (lambda: rd.ned_loss(_ModelOutput(_X), _X, _T), TypeError,
     r"^ned_loss: input is a _ModelOutput \(a diffusers model output\): pass its .sample$"),
    (lambda: rd.RobustDiffusionLoss("ned")(_X, _X, [0, 10, 500, 999]), TypeError,
     r"^RobustDiffusionLoss: t must be a tensor, got list \(torch.as_tensor\(t, device=input.device\)\)$"),
    (lambda: rd.hellinger_loss(_X, _X, [0, 10, 500, 999]), TypeError, r"^hellinger_loss: t must be a tensor, got list"),
    (lambda: rd.RobustDiffusionLoss("ned", rd.FlowMatchingSchedule())(_X, _X, _T.float()), ValueError,
     r"t must lie in \[0, 1\] for a continuous schedule, got values in \[0, 999\] \(diffusers' flow-matching "
     r"timesteps are sigma \* num_train_timesteps: pass the sigmas"),
    (lambda: rd.NoiseSchedule.linear(rd.NoiseSchedule.linear()), TypeError,
     r"^num_timesteps must be a positive integer, got a NoiseSchedule: pass its number of steps"),
    (lambda: rd.InfluenceTracker(100, num_timesteps=rd.NoiseSchedule.linear()), TypeError,
     r"^InfluenceTracker: num_timesteps must be a positive integer, got a NoiseSchedule: pass its number of steps"),
    (lambda: rd.RobustDiffusionLoss("ned")(_X[:0], _X[:0], _T[:0]), ValueError,
     r"^RobustDiffusionLoss: input has an empty batch \(size\(0\) == 0\)"),
    (lambda: rd.ned_loss(_X[:0], _X[:0]), ValueError, r"^ned_loss: input has an empty batch"),
    (lambda: rd.RobustDiffusionLoss("ned")(_X, _X, _T.to(torch.int16)), TypeError,
     r"^RobustDiffusionLoss: t must hold integer timesteps \(int32/int64\), got dtype torch.int16 \(t.long\(\)"),
    (lambda: rd.ned_loss(_X, _X, _T.to(torch.uint8)), TypeError,
     r"^ned_loss: t must hold integer timesteps \(int32/int64\), got dtype torch.uint8 \(t.long\(\) converts it\)$"),
    (lambda: rd.NoiseSchedule(torch.zeros(10)), ValueError, r"^the schedule adds no noise: alphas_cumprod is 1"),
    (lambda: rd.NoiseSchedule.from_alphas_cumprod(torch.ones(10)), ValueError, r"^the schedule adds no noise"),
]


@pytest.mark.parametrize("mistake, error, message", USER_MISTAKES, ids=[m for _, _, m in USER_MISTAKES])
def test_12_the_mistakes_users_make_first_get_a_line_that_names_the_fix(mistake, error, message):
    with pytest.raises(error, match=message) as raised:
        mistake()
    assert len(str(raised.value).splitlines()) == 1


# --------------------------------------------------------------------------- AMP with GradScaler
def _amp_run(overflow_steps, steps=120, seed=0):
    """An fp16 autocast denoiser on the CPU, trained with the robust loss and a GradScaler; at each step of
    ``overflow_steps`` the forward pass overflows (inf outputs), as an fp16 activation blow-up would."""
    torch.manual_seed(seed)
    dim = 8
    schedule = rd.NoiseSchedule.linear(100)
    model = torch.nn.Sequential(torch.nn.Linear(dim + 1, 64), torch.nn.SiLU(), torch.nn.Linear(64, dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    loss_fn = rd.RobustDiffusionLoss("hellinger", schedule, num_buckets=4, update="step")
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(512, dim, generator=g) * 0.5 + 1.0
    held_out = (data[:64], torch.randint(0, 100, (64,), generator=g), torch.randn(64, dim, generator=g))

    def predict(x0, t, noise):
        x_t = schedule.q_sample(x0, t, noise)
        return model(torch.cat([x_t, t[:, None].float() / 100], 1))

    skipped_by_scaler = 0
    for step in range(steps):
        x0 = data[torch.randint(0, 512, (32,), generator=g)]
        t, noise = torch.randint(0, 100, (32,), generator=g), torch.randn(32, dim, generator=g)
        with torch.autocast("cpu", dtype=torch.float16):
            output = predict(x0, t, noise)
            if step in overflow_steps:
                output = output * torch.tensor(1e5, dtype=torch.float16)  # fp16 overflow: inf
        loss = loss_fn(output.float(), noise, t)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped_by_scaler += scaler.get_scale() < scale_before
        loss_fn.step(torch.isfinite(grad_norm))
        assert torch.isfinite(loss_fn.adaptive_scale.bucket_penalty).all() and loss_fn.adaptive_scale.bucket_penalty.max() < 1e3
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(predict(*held_out[:2], held_out[2]), held_out[2]).item()
    return mse, loss_fn, skipped_by_scaler


@pytest.mark.slow
def test_amp_fp16_overflow_steps_leave_no_trace_and_training_reaches_the_same_loss():
    clean_mse, clean_fn, clean_skips = _amp_run(overflow_steps=())
    faulty_mse, faulty_fn, faulty_skips = _amp_run(overflow_steps=(1, 50))
    assert faulty_skips >= clean_skips + 2  # the scaler did skip the two injected steps
    assert int(faulty_fn.adaptive_scale.skipped_updates) == int(clean_fn.adaptive_scale.skipped_updates) + 2
    assert faulty_mse < 1.2 * clean_mse + 0.02, (faulty_mse, clean_mse)
    torch.testing.assert_close(faulty_fn.adaptive_scale.bucket_penalty, clean_fn.adaptive_scale.bucket_penalty, rtol=0.25, atol=0)
    initial = _amp_run(overflow_steps=(), steps=1)[0]
    assert clean_mse < 0.7 * initial  # it did train


def test_a_nan_influence_weight_never_poisons_the_trainers_influence_averages(tmp_path):
    """The per-sample influence averages (what the data audit ranks) and the logged means skip a draw whose
    weight is NaN, instead of turning that sample's average NaN for the rest of the run."""
    from robust_diffusion.training.trainer import TrainConfig, Trainer

    class NaNOnce(rd.RobustDiffusionLoss):
        calls = 0

        def forward(self, input, target, t, weight=None):
            loss = super().forward(input, target, t, weight)
            NaNOnce.calls += 1
            if NaNOnce.calls == 2:
                self.last_influence = self.last_influence.clone().index_fill_(0, torch.tensor([0]), math.nan)
            return loss

    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    schedule = rd.NoiseSchedule.linear(50)
    torch.manual_seed(0)
    model = experiment.build_model("micro", 1)
    trainer = Trainer(model, NaNOnce("hellinger", schedule, update="step"), torch.utils.data.TensorDataset(images), schedule,
                      TrainConfig(steps=4, batch_size=8, log_every=2, progress=False), out_dir=tmp_path)
    trainer.train()
    mean, count = trainer.average_influence()
    assert torch.isfinite(mean[count > 0]).all() and count.sum() == 4 * 8 - 1
    rows = (tmp_path / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert all(row.split(",")[header.index("influence_mean")] not in ("", "nan") for row in rows[1:])


# --------------------------------------------------------------------------- kill and resume
_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import robust_diffusion as rd
    from robust_diffusion.training.data import contaminate
    from robust_diffusion.training.experiment import build_model
    from robust_diffusion.training.trainer import TrainConfig, Trainer

    out, kill_at = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    POISON_AT = 4

    class Poisoned(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.poison = model, False
        def forward(self, x, t):
            out = self.model(x, t)
            return out * 1e18 if self.poison else out  # finite penalties of ~1e36: an absurd batch statistic

    class Run(Trainer):
        def _train_step(self, x0, indices):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.model.poison = self.step == POISON_AT
            super()._train_step(x0, indices)

    images = torch.rand(48, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    schedule = rd.NoiseSchedule.linear(100)
    torch.manual_seed(0)
    trainer = Run(Poisoned(build_model("micro", 1)),
                  rd.RobustDiffusionLoss("hellinger", schedule, num_buckets=4, update="step"),
                  contaminate(images, 0.25, "noise", seed=0), schedule,
                  TrainConfig(steps=30, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=5, progress=False),
                  out_dir=out)
    trainer.resume()
    trainer.train()
""")


@pytest.mark.slow
def test_kill_and_resume_with_a_poisoned_adaptive_scale_matches_the_uninterrupted_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    def run(out, kill_at):
        return subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(out), str(kill_at)], env=env,
                              capture_output=True, text=True, timeout=600)

    reference = run(tmp_path / "reference", -1)
    assert reference.returncode == 0, reference.stderr
    killed = run(tmp_path / "killed", 12)  # after the checkpoint of step 10, mid-interval
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_checkpoint(tmp_path / "killed" / "checkpoint.safetensors")["step"] == 10
    resumed = run(tmp_path / "killed", -1)
    assert resumed.returncode == 0, resumed.stderr

    final = read_checkpoint(tmp_path / "killed" / "checkpoint.safetensors")
    expected = read_checkpoint(tmp_path / "reference" / "checkpoint.safetensors")
    for key in ("model", "ema", "loss_fn"):
        assert final[key].keys() == expected[key].keys()
        for name in final[key]:
            assert torch.equal(final[key][name], expected[key][name]), (key, name)
    state = {name.removeprefix("adaptive_scale."): value for name, value in final["loss_fn"].items()}
    assert int(state["limited_updates"]) >= 1 and int(state["skipped_updates"]) == 0
    assert torch.isfinite(state["bucket_penalty"]).all() and state["bucket_penalty"].max() < 10.0  # recovered
    rows = (tmp_path / "killed" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "scale_limited" in header and rows[-1].split(",")[header.index("scale_limited")] == str(
        int(state["limited_updates"]))
