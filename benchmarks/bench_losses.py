"""Forward + backward time of the fused losses against the same loss written in eager PyTorch, that
composite under torch.compile, and plain F.mse_loss (docs/DESIGN.md, Losses, issue 3).

The memory floor of one training step's loss is 5N elements moved: the forward reads input and target
(2N), the backward reads them again and writes the input gradient (3N). ``floor %`` is that traffic
at the measured device-to-device copy bandwidth divided by the measured time (100% = at the floor).

    python benchmarks/bench_losses.py                      # CPU, writes benchmarks/RESULTS.md section
    python benchmarks/bench_losses.py --device cuda        # on a GPU

Results are appended to benchmarks/RESULTS.md with the device, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import robust_diffusion as rd

SHAPES = [(128, 3, 32, 32), (64, 4, 64, 64), (16, 16, 128, 128), (256, 3, 64, 64)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hellinger_composite(x, y, scale):
    """The Hellinger loss as a user would write it in PyTorch (float32 math, per-sample MSE)."""
    r = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (4.0 * (1.0 - torch.exp(-scale * r / 4.0))).mean()


def ours(x, y, scale):
    return rd.hellinger_loss(x, y, scale=scale)


def mse(x, y, scale):
    return F.mse_loss(x, y)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, warmup: int, repeat: int) -> float:
        """Median milliseconds of fn() (which must do forward and backward)."""
        for _ in range(warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            for _ in range(repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    numel = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), warmup=3, repeat=20)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def step(loss_fn, inputs, index):
    """One forward + backward on the next input set (sets rotate so caches do not flatter small shapes)."""
    def run():
        x, y, scale = inputs[index[0] % len(inputs)]
        index[0] += 1
        x.grad = None
        loss_fn(x, y, scale).backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = Timer(device)
    repeat = args.repeat or 50
    bandwidth = copy_bandwidth(device, timer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads, {torch.ops.robust_diffusion.cpu_instruction_set()} kernels"
    compiled = torch.compile(hellinger_composite, dynamic=False) if not args.no_compile else None

    rows = []
    for shape in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            numel = 1
            for s in shape:
                numel *= s
            sets = max(1, min(8, (256 << 20) // (2 * numel * dtype.itemsize))) if device.type == "cuda" else 1
            inputs = []
            for _ in range(sets):
                x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                y = torch.randn(shape, device=device, dtype=dtype)
                inputs.append((x, y, torch.full((shape[0],), 0.5, device=device)))
            times = {}
            for label, fn in (("ours", ours), ("eager", hellinger_composite), ("compile", compiled), ("mse", mse)):
                if fn is None:
                    continue
                times[label] = timer(step(fn, inputs, [0]), warmup=10, repeat=repeat)
            floor_ms = 5 * numel * dtype.itemsize / bandwidth * 1e3
            rows.append((shape, dtype_name, times, floor_ms))
            print(f"{str(shape):22s} {dtype_name:8s} " + "  ".join(f"{k} {v:8.3f} ms" for k, v in times.items())
                  + f"  floor {floor_ms:.3f} ms ({100 * floor_ms / times['ours']:.0f}% of floor)", flush=True)

    header = ("| shape | dtype | ours ms | eager ms | compile ms | F.mse_loss ms | ours GB/s | floor % | "
              "vs eager | vs compile |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for shape, dtype_name, times, floor_ms in rows:
        numel = 1
        for s in shape:
            numel *= s
        gbps = 5 * numel * DTYPES[dtype_name].itemsize / (times["ours"] * 1e-3) / 1e9
        compile_ms = times.get("compile")
        lines.append(
            f"| {tuple(shape)} | {dtype_name} | {times['ours']:.3f} | {times['eager']:.3f} | "
            f"{compile_ms:.3f} | {times['mse']:.3f} | {gbps:.1f} | {100 * floor_ms / times['ours']:.0f}% | "
            f"{times['eager'] / times['ours']:.2f}x | {compile_ms / times['ours']:.2f}x |" if compile_ms else
            f"| {tuple(shape)} | {dtype_name} | {times['ours']:.3f} | {times['eager']:.3f} | - | {times['mse']:.3f} | "
            f"{gbps:.1f} | {100 * floor_ms / times['ours']:.0f}% | {times['eager'] / times['ours']:.2f}x | - |")
    section = (f"\n## {name}: torch {torch.__version__}, {datetime.date.today().isoformat()}\n\n"
               f"Hellinger loss, forward + backward, median of {repeat} runs; measured copy bandwidth "
               f"{bandwidth / 1e9:.1f} GB/s (read + write). Command: `python benchmarks/bench_losses.py "
               f"--device {args.device}`.\n\n" + header + "\n".join(lines) + "\n")
    out = Path(args.out)
    if not out.exists():
        out.write_text("# Benchmark results\n\nWritten by `benchmarks/bench_losses.py`; newest sections last.\n")
    with out.open("a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()
