"""What robustness costs per training step: one DDPM training step with
``RobustDiffusionLoss`` (adaptive scale, Min-SNR weighting, the adaptive state's update included) against the same
step with ``F.mse_loss``, for the example's ``quick`` UNet and the larger ``small`` one at batch 32 and 128.

A step is what the Trainer does: draw timesteps and noise, noise the batch, run the model, the loss, backward,
clip the gradient norm, AdamW, and (robust loss only) commit the batch's statistic to the adaptive state
(``loss_fn.step``). Both variants share one model and optimizer and run in alternating blocks of about a second,
so drift in the machine's speed hits both alike; the overhead is the median over blocks of the paired ratio. The
loss alone (forward + backward + state update, against ``F.mse_loss``'s forward + backward on the same tensors) is
timed too: on a CPU the step-time difference is within the noise, the loss time is not.

    python benchmarks/bench_train_step.py                  # CPU; appends a section to benchmarks/RESULTS.md
    python benchmarks/bench_train_step.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import robust_diffusion as rd
from robust_diffusion.training.experiment import build_model

from bench_losses import cpu_model

#: (model preset, image side): the example's quick UNet on 28x28 Fashion-MNIST, the full preset's 32x32 one.
MODELS = (("quick", 28), ("small", 32))
BATCHES = (32, 128)
LOSS = "ned"
WEIGHTING = "min_snr"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model, optimizer, schedule, loss_fn, images, generator):
    """One step as the Trainer takes it; ``loss_fn`` None is the plain ``F.mse_loss``."""
    batch = images.shape[0]
    t = schedule.sample_timesteps(batch, device=images.device, generator=generator)
    noise = torch.randn(images.shape, device=images.device, generator=generator)
    output = model(schedule.q_sample(images, t, noise), t)
    loss = F.mse_loss(output, noise) if loss_fn is None else loss_fn(output, noise, t)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if loss_fn is not None:
        loss_fn.step(torch.isfinite(grad_norm))


def blocks(functions, device, seconds_per_block, budget):
    """Per-step milliseconds of each function over alternating blocks (the order flips every round)."""
    for fn in functions:  # warm-up: allocator, kernels, the adaptive state's seeding
        for _ in range(2):
            fn()
    synchronize(device)
    start = time.perf_counter()
    functions[0]()
    synchronize(device)
    per_call = time.perf_counter() - start
    steps = max(1, round(seconds_per_block / per_call))
    rounds = max(3, math.ceil(budget / (len(functions) * steps * per_call)))
    times = [[] for _ in functions]
    for r in range(rounds):
        order = range(len(functions)) if r % 2 == 0 else reversed(range(len(functions)))
        for i in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                functions[i]()
            synchronize(device)
            times[i].append((time.perf_counter() - start) * 1e3 / steps)
    return times


def measure(preset: str, side: int, batch: int, device: torch.device, budget: float):
    torch.manual_seed(0)
    schedule = rd.NoiseSchedule.linear()
    model = build_model(preset, 1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 1, side, side, device=device) * 2 - 1
    robust = rd.RobustDiffusionLoss(LOSS, schedule, weighting=WEIGHTING, update="step").to(device)
    generator = torch.Generator(device).manual_seed(0)
    plain = lambda: training_step(model, optimizer, schedule, None, images, generator)  # noqa: E731
    robust_step = lambda: training_step(model, optimizer, schedule, robust, images, generator)  # noqa: E731
    step_mse, step_robust = blocks([plain, robust_step], device, 1.0, budget)
    ratios = sorted(b / a for a, b in zip(step_mse, step_robust))

    # The loss alone, on a model output's shape: forward + backward (+ the state update for ours).
    output = torch.randn(batch, 1, side, side, device=device, requires_grad=True)
    target = torch.randn_like(output)
    t = schedule.sample_timesteps(batch, device=device, generator=generator)

    def loss_mse():
        output.grad = None
        F.mse_loss(output, target).backward()

    ok = torch.isfinite(torch.ones((), device=device))  # a flag on the device, as the Trainer's

    def loss_robust():
        output.grad = None
        robust(output, target, t).backward()
        robust.step(ok)

    loss_times = blocks([loss_mse, loss_robust], device, 0.2, min(10.0, budget / 4))
    return dict(model=preset, parameters=sum(p.numel() for p in model.parameters()), side=side, batch=batch,
                step_mse=statistics.median(step_mse), step_robust=statistics.median(step_robust),
                overhead=statistics.median(ratios) - 1, overhead_low=ratios[0] - 1, overhead_high=ratios[-1] - 1,
                blocks=len(ratios), loss_mse=statistics.median(loss_times[0]),
                loss_robust=statistics.median(loss_times[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of step timing per configuration")
    parser.add_argument("--models", nargs="+", default=[m for m, _ in MODELS], choices=[m for m, _ in MODELS])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_model()}, {torch.get_num_threads()} threads")
    sides = dict(MODELS)
    rows = []
    for preset in args.models:
        for batch in args.batches:
            row = measure(preset, sides[preset], batch, device, args.budget)
            rows.append(row)
            print(f"{preset:6s} batch {batch:4d}: step {row['step_mse']:.1f} ms (F.mse_loss) / "
                  f"{row['step_robust']:.1f} ms ({LOSS}), overhead {100 * row['overhead']:+.1f}% "
                  f"[{100 * row['overhead_low']:+.1f}%, {100 * row['overhead_high']:+.1f}%]; loss alone "
                  f"{row['loss_mse']:.3f} / {row['loss_robust']:.3f} ms", flush=True)
    header = ("| model | batch | step ms, F.mse_loss | step ms, ours | step overhead, median [range] | "
              "loss ms, F.mse_loss | loss ms, ours | loss difference / step |\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['model']} ({r['parameters'] / 1e6:.2f}M, {r['side']}x{r['side']}) | {r['batch']} | "
             f"{r['step_mse']:.1f} | {r['step_robust']:.1f} | {100 * r['overhead']:+.1f}% "
             f"[{100 * r['overhead_low']:+.1f}%, {100 * r['overhead_high']:+.1f}%] ({r['blocks']} blocks) | "
             f"{r['loss_mse']:.3f} | {r['loss_robust']:.3f} | "
             f"{100 * (r['loss_robust'] - r['loss_mse']) / r['step_mse']:.2f}% |" for r in rows]
    command = "python benchmarks/bench_train_step.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    section = (f"\n## Training step, {name}: torch {torch.__version__}, {datetime.date.today().isoformat()}\n\n"
               f"One DDPM training step (noising, UNet forward, loss, backward, gradient clipping, AdamW) with "
               f"`RobustDiffusionLoss(\"{LOSS}\", weighting=\"{WEIGHTING}\")` at the adaptive scale (its state update "
               f"`loss_fn.step` included) against the same step with `F.mse_loss`: medians over alternating blocks "
               f"of about a second. The loss columns time the loss alone (forward + backward, and the state update "
               f"for ours) on the model output's shape; the last column is that difference as a share of the step. "
               f"Command: `{command}`.\n\n" + header + "\n".join(lines) + "\n")
    out = Path(args.out)
    with out.open("a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()
