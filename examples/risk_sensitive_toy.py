"""Risk-sensitive diffusion on a 2-D toy: a ring of 8 Gaussians where half the training samples carry known
Gaussian noise of varying std (docs/DESIGN.md, Risk, [RISK]).

Each model is the same small MLP epsilon-predictor trained for the same number of steps and batch size on a
linear DDPM schedule (T = 1000), then sampled with DDPM ancestral sampling (``--sample-steps``, respaced):

- ``standard``: the usual loss on every training sample, noisy ones included (they blur the modes);
- ``risk-free``: the same data with its risks: per-sample timesteps on each stability interval
  (:func:`robust_diffusion.risk.sample_timesteps`), risk-sensitive noising and :func:`robust_diffusion.risk_free_loss`
  with the (v / sigma)^2 variance weight;
- ``risk-free (no variance weight)``: the paper's plain risk-free loss;
- ``clean subset``: the standard loss on the clean half only (the noisy half dropped);
- ``oracle``: the standard loss on the clean versions of every training sample (not available in practice).

Metrics against fresh samples of the clean distribution: sliced Wasserstein-2 (256 projections), RBF MMD^2 (on
2000 points) and the mean distance of a generated point to its nearest mode centre; a second clean sample of the
same size is scored as the reference row (the finite-sample floor). Writes ``results.csv``, ``results.md`` and ``samples.png`` to ``--out``.

    PYTHONPATH=python python3 examples/risk_sensitive_toy.py --out outputs/risk_toy
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import robust_diffusion as rd
from robust_diffusion import risk as rk
from robust_diffusion.training.metrics import mmd_rbf, sliced_wasserstein
from robust_diffusion.training.models import timestep_embedding
from robust_diffusion.training.sampling import ddpm_sample

MODES = 8
RADIUS = 1.0
MODE_STD = 0.05


def mode_centres() -> Tensor:
    angles = torch.arange(MODES, dtype=torch.float32) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def sample_ring(n: int, generator: torch.Generator) -> Tensor:
    modes = torch.randint(0, MODES, (n,), generator=generator)
    return mode_centres()[modes] + MODE_STD * torch.randn(n, 2, generator=generator)


class MLPDenoiser(nn.Module):
    """eps_hat(x_t, t): the sinusoidal timestep embedding concatenated to x_t, then an MLP."""

    def __init__(self, hidden: int = 128, depth: int = 3, embed_dim: int = 32):
        super().__init__()
        self.embed_dim = embed_dim
        layers: List[nn.Module] = []
        width = 2 + embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, self.embed_dim)], dim=1))


def train(name: str, data: Tensor, risk: Tensor, method: str, schedule: rd.NoiseSchedule, args,
          seed: int) -> MLPDenoiser:
    """One model; ``method`` is "standard" or "risk_free" / "risk_free_unweighted" (which use ``risk``)."""
    torch.manual_seed(seed)
    model = MLPDenoiser(hidden=args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(args.steps), desc=name, unit="step", leave=False, mininterval=1.0):
        index = torch.randint(0, data.shape[0], (args.batch,), generator=generator)
        x, r = data[index], risk[index]
        noise = torch.randn(x.shape, generator=generator)
        if method == "standard":
            t = schedule.sample_timesteps(args.batch, generator=generator)
            loss = rd.kl_loss(model(schedule.q_sample(x, t, noise), t), noise)
        else:
            t = rk.sample_timesteps(schedule, r, margin=args.margin, generator=generator)
            noising = rk.risk_noising(x, r, t, noise, schedule=schedule)
            loss = rk.risk_free_loss(model(noising.noisy, t), noising, t, schedule=schedule,
                                     variance_weight=method == "risk_free")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_decay.step()
    return model.eval()


def nearest_mode_distance(points: Tensor) -> float:
    return torch.cdist(points, mode_centres()).min(dim=1).values.mean().item()


MMD_POINTS = 2000  # MMD needs N x M kernel matrices: a subset keeps them small


def evaluate(points: Tensor, reference: Tensor, seed: int) -> Dict[str, float]:
    return {
        "sliced_w2": sliced_wasserstein(points, reference, n_projections=256,
                                        generator=torch.Generator().manual_seed(seed)),
        "mmd2": mmd_rbf(points[:MMD_POINTS], reference[:MMD_POINTS]),
        "mode_distance": nearest_mode_distance(points),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="outputs/risk_toy", help="output folder")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per model")
    parser.add_argument("--batch", type=int, default=1024, help="batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay)")
    parser.add_argument("--train-size", type=int, default=20000, help="training samples")
    parser.add_argument("--noisy-fraction", type=float, default=0.5, help="fraction of samples perturbed")
    parser.add_argument("--risk-min", type=float, default=0.1, help="smallest perturbation std")
    parser.add_argument("--risk-max", type=float, default=0.5, help="largest perturbation std")
    parser.add_argument("--margin", type=float, default=0.0, help="stability margin of the risk-free sampler")
    parser.add_argument("--hidden", type=int, default=128, help="MLP width (3 hidden layers)")
    parser.add_argument("--num-samples", type=int, default=5000, help="generated samples per model")
    parser.add_argument("--sample-steps", type=int, default=250,
                        help="DDPM ancestral sampling steps (respaced from T = 1000; 1000 = every step)")
    parser.add_argument("--seeds", type=int, default=1, help="repetitions (data, training and sampling seeds)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation (and fight on shared CPUs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = rd.NoiseSchedule.linear()

    methods: Dict[str, Callable] = {
        "standard": lambda d: (d["noisy"], d["zero_risk"], "standard"),
        "risk-free": lambda d: (d["noisy"], d["risk"], "risk_free"),
        "risk-free (no variance weight)": lambda d: (d["noisy"], d["risk"], "risk_free_unweighted"),
        "clean subset": lambda d: (d["clean_subset"], d["zero_risk"][: d["clean_subset"].shape[0]], "standard"),
        "oracle (clean data)": lambda d: (d["clean"], d["zero_risk"], "standard"),
    }
    rows: List[Dict[str, object]] = []
    shown: Dict[str, Tensor] = {}
    started = time.time()
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        clean = sample_ring(args.train_size, g)
        perturbed = torch.rand(args.train_size, generator=g) < args.noisy_fraction
        risk = torch.where(perturbed, args.risk_min + (args.risk_max - args.risk_min) * torch.rand(args.train_size,
                                                                                                   generator=g),
                           torch.zeros(args.train_size))
        noisy = clean + risk[:, None] * torch.randn(args.train_size, 2, generator=g)
        data = {"clean": clean, "noisy": noisy, "risk": risk, "zero_risk": torch.zeros(args.train_size),
                "clean_subset": noisy[~perturbed]}
        reference = sample_ring(args.num_samples, torch.Generator().manual_seed(2000 + seed))
        rows.append({"method": "clean distribution (reference)", "seed": seed, "train_s": 0.0,
                     **evaluate(sample_ring(args.num_samples, torch.Generator().manual_seed(3000 + seed)), reference,
                                seed)})
        if seed == 0:
            shown["training data"] = noisy
            shown["_perturbed"] = perturbed
        for name, pick in methods.items():
            x, r, method = pick(data)
            begin = time.time()
            model = train(f"seed {seed} {name}", x, r, method, schedule, args, seed=10 * seed)
            train_s = time.time() - begin
            points = ddpm_sample(model, schedule, (args.num_samples, 2), num_steps=args.sample_steps,
                                 clip_denoised=False, generator=torch.Generator().manual_seed(4000 + seed))
            rows.append({"method": name, "seed": seed, "train_s": train_s, **evaluate(points, reference, seed)})
            tqdm.write(f"seed {seed} {name:32s} SW2 {rows[-1]['sliced_w2']:.4f}  MMD2 {rows[-1]['mmd2']:.5f}  "
                       f"mode distance {rows[-1]['mode_distance']:.4f}  ({train_s:.0f} s)")
            if seed == 0:
                shown[name] = points

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    (out / "results.md").write_text(markdown(summary, args, time.time() - started))
    plot(shown, summary, out / "samples.png")
    print((out / "results.md").read_text())


def summarize(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    summary = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        entry = {"method": name, "seeds": len(mine)}
        for key in ("sliced_w2", "mmd2", "mode_distance"):
            values = torch.tensor([float(r[key]) for r in mine], dtype=torch.float64)
            entry[key] = values.mean().item()
            entry[key + "_sd"] = values.std().item() if len(mine) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown(summary: List[Dict[str, object]], args, seconds: float) -> str:
    lines = [
        f"Ring of {MODES} Gaussians (radius {RADIUS}, std {MODE_STD}); {args.train_size} training samples, "
        f"{args.noisy_fraction:.0%} perturbed with Gaussian noise of known std ~ U({args.risk_min}, {args.risk_max}). "
        f"MLP epsilon-predictor, {args.steps} steps x batch {args.batch} per model, linear DDPM schedule T = 1000, "
        f"DDPM ancestral sampling ({args.sample_steps} steps, {args.num_samples} samples); mean +- sd over {args.seeds} seed(s); "
        f"total {seconds / 60:.1f} min.",
        "",
        "| method | sliced W2 | MMD^2 | mean distance to nearest mode |",
        "|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['method']} | {s['sliced_w2']:.4f} +- {s['sliced_w2_sd']:.4f} | "
                     f"{s['mmd2']:.5f} +- {s['mmd2_sd']:.5f} | {s['mode_distance']:.4f} +- {s['mode_distance_sd']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(shown: Dict[str, Tensor], summary: List[Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = {s["method"]: s["sliced_w2"] for s in summary}
    panels = [k for k in shown if not k.startswith("_")]
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.7 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, panels):
        points = shown[name].numpy()
        if name == "training data":
            perturbed = shown["_perturbed"].numpy()
            ax.scatter(*points[perturbed].T, s=1, alpha=0.3, color="tab:red", label="perturbed (known std)")
            ax.scatter(*points[~perturbed].T, s=1, alpha=0.3, color="tab:blue", label="clean")
            ax.legend(loc="upper right", fontsize=7, markerscale=6)
            ax.set_title("training data", fontsize=9)
        else:
            ax.scatter(*points[:3000].T, s=1, alpha=0.4, color="black")
            ax.set_title(f"{name}\nSW2 {sw[name]:.4f}", fontsize=9)
        ax.set_xlim(-1.8, 1.8)
        ax.set_ylim(-1.8, 1.8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
