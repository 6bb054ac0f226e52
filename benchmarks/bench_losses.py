"""Forward + backward time of the fused losses against the same loss written in eager PyTorch, that
composite under torch.compile, and plain F.mse_loss (docs/DESIGN.md, Kernels).

Bytes moved: a per-sample loss has to read input and target and write the input's gradient, 3N elements, the
one-pass floor that the CPU path (<loss>_with_grad, the gradient computed in the forward's pass) aims at. A
forward and a separate backward (what autograd gives torch.compile, and what our CUDA path does) read input and
target twice: 5N, the two-pass floor. ``% of 3N`` and ``% of 5N`` are those bytes at the copy bandwidth (a
copy_ timed in the same rounds) divided by the measured time (100% = at the floor). On a CPU each line written
is first read (write-allocate), in the copy as in every kernel here, so a kernel at the hardware's limit shows
112% of the 3N floor (4 moves for 3 counted, against the copy's 3 for 2) and 125% of the 5N floor; where the
CPU kernels stream the gradient past the caches (data beyond the last-level cache: the one-pass kernel and the
backward of the two passes) they skip that read, and the limit is 150% of either floor. The input sets rotate
through a working set of at least twice the last-level cache (on a GPU, 256 MB), one rotation shared by all
contenders: each call takes the next set, so every call reads from memory, not from a cache the call before it
filled. Besides the four listed shapes, two rows are sized beyond any cache (``3N MB``: the floor's bytes),
where a call's share of the 3N floor does not depend on the rotation.

    python benchmarks/bench_losses.py                      # CPU, writes benchmarks/RESULTS.md section
    python benchmarks/bench_losses.py --device cuda        # on a GPU

Columns: ``ours`` is the loss through autograd as a training loop calls it (``loss.backward()``);
``two-pass`` the same with the one-pass gradient off (``robust_diffusion.ops.cpu_one_pass(False)``): the
forward operator, then the backward operator (the CUDA path, what torch.compile and torch.export graphs run
on the CPU, and the CPU path before the one-pass kernel);
``kernel`` the operator that computes the loss and its gradient (``hellinger_loss_with_grad``) called
alone, without Python and autograd around it: ``ours`` less ``kernel`` is what a call costs besides moving
the data. That cost is also measured on its own, for ours, ``F.mse_loss`` and ``x.sum().backward()`` (the
least any call through ``loss.backward()`` costs): one call on a 4x8 input right after a copy that evicts
the caches, as each call in the table finds them. Results are appended to
benchmarks/RESULTS.md with the device, torch version and date; its "Current numbers" section is kept by hand.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import robust_diffusion as rd

# glibc returns large freed blocks to the system and faults fresh pages in (zeroed by the kernel) on the next
# allocation: every contender allocates its gradient each step, and on a virtual machine those faults are slow
# and erratic. Keeping freed memory in the process measures the kernels; --system-malloc measures with them.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"

SHAPES = [(128, 3, 32, 32), (64, 4, 64, 64), (16, 16, 128, 128), (256, 3, 64, 64)]
# The four above fit in a large server's last-level cache (105 MB on this project's Xeon; their 3N bytes are
# 5-50 MB in float32), where only the rotation of input sets keeps them out of it. These two do not fit in any:
# 201-403 MB of 3N, samples of one chunk and of sixteen (the CPU kernel's two one-pass paths).
BEYOND_CACHE_SHAPES = [(2048, 4, 64, 64), (128, 16, 128, 128)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hellinger_composite(x, y, scale):
    """The Hellinger loss as a user would write it in PyTorch (float32 math, per-sample MSE)."""
    r = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (4.0 * (1.0 - torch.exp(-scale * r / 4.0))).mean()


def ours(x, y, scale):
    return rd.hellinger_loss(x, y, scale=scale)


def kernel(x, y, scale):
    """The fused forward + gradient operator alone (one pass on the CPU; on CUDA it runs the two passes)."""
    return torch.ops.robust_diffusion.hellinger_loss_with_grad(x.detach(), y, scale, None, "mean", "mean")


def mse(x, y, scale):
    return F.mse_loss(x, y)


def least(x, y, scale):
    """The cheapest differentiable call there is: the fixed cost of any loss called through loss.backward()."""
    return x.sum()


def two_pass(x, y, scale):
    """ours with the one-pass CPU gradient off: the forward operator, then the backward operator."""
    with rd.ops.cpu_one_pass(False):
        return ours(x, y, scale)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def once(self, fn) -> float:
        """Milliseconds of one fn() call."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn, warmup: int, repeat: int) -> float:
        """Median milliseconds of fn()."""
        return self.compare({"fn": fn}, warmup, repeat)["fn"]

    def compare(self, fns: dict, warmup: int, repeat: int) -> dict:
        """Median milliseconds of each of fns, timed in turn, one call each per round, so that a slow spell of
        the machine (a shared virtual CPU) falls on every contender alike."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times = {label: [] for label in fns}
        for _ in range(repeat):
            for label, fn in fns.items():
                times[label].append(self.once(fn))
        return {label: statistics.median(t) for label, t in times.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Copy:
    """copy_ of the next input set's input into a buffer of its own: the memory-speed reference of a row,
    timed in the same rounds as the losses so that the machine's speed at that moment is the one measured."""

    def __init__(self, inputs, index):
        self.pairs = [(x.detach(), x.detach().clone()) for x, _, _ in inputs]  # buffers already touched
        self.index = index

    def __call__(self):
        src, dst = self.pairs[self.index[0] % len(self.pairs)]
        self.index[0] += 1
        dst.copy_(src)


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache as the kernels see it (sysconf; 32 MB where it cannot be read)."""
    return torch.ops.robust_diffusion._cpu_last_level_cache_bytes()


def working_set_bytes(device: torch.device) -> int:
    """Bytes that do not fit in the caches: twice the CPU's last-level cache, 256 MB on a GPU."""
    return (256 << 20) if device.type == "cuda" else 2 * last_level_cache_bytes()


def input_sets(device: torch.device, numel: int, itemsize: int) -> int:
    """How many input sets to rotate through so that they do not fit in the last-level cache."""
    return max(1, min(256, -(-working_set_bytes(device) // (2 * numel * itemsize))))


def step(loss_fn, inputs, index, backward=True):
    """One forward + backward on the next input set (sets rotate so caches do not flatter small shapes).
    Without backward, loss_fn returns the gradient itself, kept with its set until the set's next call, as
    autograd keeps .grad: a buffer freed at once would be handed back warm to the next call."""
    kept = [None] * len(inputs)

    def run():
        i = index[0] % len(inputs)
        index[0] += 1
        x, y, scale = inputs[i]
        if backward:
            x.grad = None
            loss_fn(x, y, scale).backward()
        else:
            kept[i] = None
            kept[i] = loss_fn(x, y, scale)
    return run


def fixed_cost_us(timer: Timer, device: torch.device, rounds: int) -> dict:
    """Microseconds of one forward + backward of ours, F.mse_loss and x.sum() on a 4x8 input, each call right
    after a copy through twice the last-level cache (so code and data come from memory, as for a call in the
    table): the per-call cost besides moving the data."""
    numel = working_set_bytes(device) // 8  # a float32 source and destination of half the working set each
    evict_src, evict_dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    x = torch.randn(4, 8, device=device, requires_grad=True)
    y, scale = torch.randn(4, 8, device=device), torch.full((4,), 0.5, device=device)
    fns = {"ours": ours, "mse": mse, "sum": least}
    times = {label: [] for label in fns}
    for fn in fns.values():
        for _ in range(3):
            step(fn, [(x, y, scale)], [0])()
    for _ in range(rounds):
        for label, fn in fns.items():
            evict_dst.copy_(evict_src)
            times[label].append(1e3 * timer.once(step(fn, [(x, y, scale)], [0])))
    return {label: statistics.median(t) for label, t in times.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--shapes", default=",".join("x".join(map(str, shape)) for shape in SHAPES + BEYOND_CACHE_SHAPES),
                        help="comma-separated shapes such as 128x3x32x32")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default of returning freed memory (pays page faults each step)")
    return parser.parse_args()


def measure(timer: Timer, device: torch.device, shape, dtype, repeat: int, compile_too: bool):
    """One row: every contender's median time on rotating input sets, the 3N bytes and the copy bandwidth."""
    numel = 1
    for size in shape:
        numel *= size
    inputs = []
    for _ in range(input_sets(device, numel, dtype.itemsize)):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        y = torch.randn(shape, device=device, dtype=dtype)
        inputs.append((x, y, torch.full((shape[0],), 0.5, device=device)))
    torch._dynamo.reset()  # a fresh compile per row: dynamo's recompile limit would fall back to eager
    contenders = {"ours": ours, "eager": hellinger_composite, "mse": mse}
    if compile_too:
        contenders["compile"] = torch.compile(hellinger_composite, dynamic=False)
    contenders["two-pass"] = two_pass
    # One rotation shared by all contenders: each call takes the next input set, so the set a call reads was last
    # read a whole rotation (2x the last-level cache) ago, not by the contender timed just before it.
    index = [0]
    fns = {label: step(fn, inputs, index) for label, fn in contenders.items()}
    fns["kernel"] = step(kernel, inputs, index, backward=False)
    fns["copy"] = Copy(inputs, index)
    times = timer.compare(fns, warmup=10, repeat=repeat)
    bytes3 = 3 * numel * dtype.itemsize
    bandwidth = 2 * numel * dtype.itemsize / (times["copy"] * 1e-3)  # read + write, bytes per second
    print(f"{str(shape):22s} {str(dtype).split('.')[-1]:8s} sets {len(inputs):3d} "
          + "  ".join(f"{k} {v:8.3f} ms" for k, v in times.items())
          + f"  {100 * bytes3 / bandwidth / (times['ours'] * 1e-3):.0f}% of the 3N floor", flush=True)
    return times, bytes3, bandwidth


def table_line(shape, dtype_name: str, times: dict, bytes3: int, bandwidth: float) -> str:
    floor3 = bytes3 / bandwidth * 1e3
    floor5 = floor3 * 5 / 3
    compile_ms = times.get("compile")
    cells = [str(tuple(shape)), dtype_name, f"{bytes3 / 1e6:.3g}", f"{times['ours']:.3f}", f"{times['two-pass']:.3f}",
             f"{times['eager']:.3f}", f"{compile_ms:.3f}" if compile_ms else "-", f"{times['mse']:.3f}",
             f"{bandwidth / 1e9:.1f}", f"{floor3:.3f}", f"{100 * floor3 / times['ours']:.0f}%",
             f"{100 * floor5 / times['two-pass']:.0f}%", f"{100 * floor5 / compile_ms:.0f}%" if compile_ms else "-",
             f"{times['eager'] / times['ours']:.2f}x", f"{compile_ms / times['ours']:.2f}x" if compile_ms else "-",
             f"{times['kernel']:.3f}", f"{100 * floor3 / times['kernel']:.0f}%"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not args.system_malloc and sys.platform.startswith("linux") and \
            "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, GLIBC_TUNABLES=KEEP_FREED_MEMORY))
    malloc = os.environ.get("GLIBC_TUNABLES", "system malloc") if device.type == "cpu" else None
    timer = Timer(device)
    repeat = args.repeat or 50
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads, {torch.ops.robust_diffusion._cpu_instruction_set()} kernels"

    shapes = [tuple(int(size) for size in text.split("x")) for text in args.shapes.split(",")]
    dtypes = {name: DTYPES[name] for name in args.dtypes.split(",")}
    lines = [table_line(shape, dtype_name, *measure(timer, device, shape, dtype, repeat, not args.no_compile))
             for shape in shapes for dtype_name, dtype in dtypes.items()]
    fixed = fixed_cost_us(timer, device, repeat)
    header = ("| shape | dtype | 3N MB | ours ms | two-pass ms | eager ms | compile ms | F.mse_loss ms | copy GB/s | "
              "3N floor ms | ours % of 3N | two-pass % of 5N | compile % of 5N | vs eager | vs compile | kernel ms | "
              "kernel % of 3N |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    cache = "256 MB" if device.type == "cuda" else f"2x the {last_level_cache_bytes() >> 20} MB last-level cache"
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {name}: torch {torch.__version__}, {written}\n\n"
               f"Hellinger loss, forward + backward, median of {repeat} runs, input sets rotating through {cache}; "
               f"the copy bandwidth (read + write) is measured in each row's own rounds, and the 3N floor (read "
               f"input and target, write the gradient) is that row's bytes at it."
               + (f" Allocator: `GLIBC_TUNABLES={malloc}` (freed memory kept, no page faults per step)."
                  if malloc and malloc != "system malloc" else " Allocator: glibc's default." if malloc else "")
               + f" Command: `python benchmarks/bench_losses.py --device {args.device}`.\n\n" + header + "\n".join(lines)
               + f"\n\nFixed cost of one call (forward + backward on a 4x8 input, caches evicted before it, median of "
               f"{repeat}): ours {fixed['ours']:.0f} us, F.mse_loss {fixed['mse']:.0f} us, x.sum() {fixed['sum']:.0f} us "
               f"(the least a call through loss.backward() costs).\n")
    out = Path(args.out)
    if not out.exists():
        out.write_text("# Benchmark results\n\nWritten by `benchmarks/bench_losses.py`; newest sections last.\n")
    with out.open("a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()
