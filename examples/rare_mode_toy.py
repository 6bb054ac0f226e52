"""A toy of the rare-truths problem: does a robust recipe silence a rare but learnable mode with the junk?

Data (32-d vectors, 1,000 of them): four common modes (67%), one rare mode (3%), each a fixed +-0.7 pattern plus
N(0, 0.15^2) per coordinate, and junk (30%): uniform noise in [-1, 1]^32, which no denoiser can learn. A small MLP
learns to predict the noise (DDPM, linear schedule, T = 1000) for 3,000 AdamW steps of batch 64 with each recipe
below; every recipe sees the same batches, timesteps and noise. Reported per group: the mean trust
(`InfluenceTracker.trust` of NED's influence weights, tracked from step 200, applied from step 600 where the recipe
uses it) and the model's denoising error at t = 50 (about 1 means not learnt; the standard MSE's is the yardstick).

    python examples/rare_mode_toy.py                  # every recipe, seed 0 (about 30 s each on one thread)
    python examples/rare_mode_toy.py --seeds 0 1 2 --recipes mse ned_tau0.25+trust

Exploration for docs/RESULTS.md ("Rare truths"), not a decision: the recipes are candidates, judged by a rule
written before the image-scale runs that decide.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

import robust_diffusion as rd

GROUPS = ("common", "rare", "junk")
TRUST_FROM, TRACK_FROM, STEPS, BATCH = 600, 200, 3000, 64


def make_data(seed: int, n: int = 1000, d: int = 32, rare: float = 0.03, junk: float = 0.3):
    """The mixture and each sample's group (0 common, 1 rare, 2 junk)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.sign(torch.randn(5, d, generator=g)) * 0.7  # four common modes and the rare one
    n_rare, n_junk = round(rare * n), round(junk * n)
    n_common = n - n_rare - n_junk
    x = torch.cat([centers[torch.randint(0, 4, (n_common,), generator=g)], centers[4].expand(n_rare, d),
                   torch.rand(n_junk, d, generator=g) * 2 - 1])
    x[:n_common + n_rare] += 0.15 * torch.randn(n_common + n_rare, d, generator=g)
    group = torch.cat([torch.zeros(n_common), torch.ones(n_rare), torch.full((n_junk,), 2.0)]).long()
    return x, group


class Denoiser(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x, t):
        angles = t.float()[:, None] / 1000 * torch.exp(torch.arange(8.0) * math.log(1000) / 8)[None]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], 1))


#: recipe: (the loss whose gradient trains, its temperature, whether trust weights it, whether coherence gates trust)
RECIPES = {
    "mse": ("mse", 1.0, False, False),
    "ned_tau0.25": ("ned", 0.25, False, False),
    "ned_tau0.25+trust": ("ned", 0.25, True, False),  # the main job's recipe
    "ned_tau1": ("ned", 1.0, False, False),  # the module's defaults
    "kl+trust": ("kl", 0.25, True, False),  # NED's trust on the KL gradient (no per-draw down-weighting)
    "kl+trust+coherence": ("kl", 0.25, True, True),  # trust only where a sample is isolated
    "ned_tau1+trust+coherence": ("ned", 1.0, True, True),  # the gate on NED's own per-draw weights
    "ned_tau0.25+trust+coherence": ("ned", 0.25, True, True),
}


def run(recipe: str, seed: int, steps: int = STEPS) -> dict:
    loss_name, temperature, use_trust, gate = RECIPES[recipe]
    x, group = make_data(seed)
    torch.manual_seed(seed)
    model = Denoiser(x.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    schedule = rd.NoiseSchedule.linear()
    ned = rd.RobustDiffusionLoss("ned", schedule, temperature=temperature, update="step")  # always tracked
    trained = {"mse": rd.RobustDiffusionLoss("kl", schedule, scale=1.0, update="step"),
               "kl": rd.RobustDiffusionLoss("kl", schedule, update="step"), "ned": ned}[loss_name]
    tracker = rd.InfluenceTracker(len(x), num_timesteps=schedule.num_timesteps)
    if gate:
        tracker.set_coherence(rd.coherence(x))
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        index = torch.randint(0, len(x), (BATCH,), generator=g)
        t = torch.randint(0, schedule.num_timesteps, (BATCH,), generator=g)
        noise = torch.randn(BATCH, x.shape[1], generator=g)
        prediction = model(schedule.q_sample(x[index], t, noise), t)
        weight = None
        if use_trust and step >= TRUST_FROM:
            weight = tracker.trust(index)
        loss = trained(prediction, noise, t, weight=weight)
        if trained is not ned:
            ned(prediction.detach(), noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.step()
        if trained is not ned:
            ned.step()
        if step >= TRACK_FROM:
            tracker.update(index, ned.last_influence, ned.last_penalty, t)
    trust = tracker.trust()
    with torch.no_grad():
        t = torch.full((len(x),), 50)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        error = (model(schedule.q_sample(x, t, noise), t) - noise).pow(2).mean(1)
    return {name: (trust[group == k].mean().item(), error[group == k].mean().item()) for k, name in enumerate(GROUPS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| recipe | seed | trust: common / rare / junk | error at t = 50: common / rare / junk |")
    print("|---|---|---|---|")
    for recipe in args.recipes:
        for seed in args.seeds:
            t0 = time.perf_counter()
            result = run(recipe, seed)
            trust = " / ".join(f"{result[g][0]:.2f}" for g in GROUPS)
            error = " / ".join(f"{result[g][1]:.3f}" for g in GROUPS)
            print(f"| {recipe} | {seed} | {trust} | {error} |", flush=True)
            print(f"({recipe}, seed {seed}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
