"""The evidence of docs/AUDIT.md: does the data audit find the contaminated images, and how fast?

    python examples/audit_evidence.py                 # every (kind, fraction) run, resumable; then the tables
    python examples/audit_evidence.py --jobs 2        # two single-thread audits at a time (a 2-core CPU)
    python examples/audit_evidence.py --report-only   # tables from the runs on disk

For each contamination kind and fraction of the protocol (docs/AUDIT.md, written before the runs) it writes the
contaminated Fashion-MNIST images and their 0/1 labels as .npy files, runs ``python -m robust_diffusion.audit``
on them with its defaults for each training budget in turn (``--resume`` continues the same run), and scores
each budget's ``ranking.csv``: AUROC and precision at k (k = the number of contaminated images) of the ranking
by mean influence weight (the audit's) and of the ranking by mean penalty (the per-sample MSE averaged over the
noise levels it was drawn at: the simple baseline), with the CPU time spent so far.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
AUDIT_MD = ROOT / "docs" / "AUDIT.md"
BEGIN, END = "<!-- audit-tables:begin -->", "<!-- audit-tables:end -->"

# The protocol (docs/AUDIT.md), fixed before any run.
NUM_IMAGES = 2000
KINDS = ("noise", "gaussian", "dataset", "inverted")
FRACTIONS = (0.1, 0.3)
BUDGETS = (250, 500, 1000)  # optimizer steps of batch 64
SCORE_FROM_STEP = 50  # the same for every budget, so a longer budget only adds draws
SEED = 0


@dataclass(frozen=True)
class Run:
    kind: str
    fraction: float

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.fraction:g}"


def contaminated_images(kind: str, fraction: float):
    """The first NUM_IMAGES Fashion-MNIST training images, a fraction of them replaced (seed SEED): images in
    [-1, 1] [N, 1, 28, 28] and their 0/1 labels. ``inverted`` (not one of the training kit's kinds) replaces an
    image by its own negative: the same garment, white on black, a contaminant that looks like data. Images are
    clipped to [-1, 1], as an image file stores them (only ``gaussian`` leaves that range)."""
    from robust_diffusion.training.experiment import load_experiment_data
    if kind == "inverted":
        data = load_experiment_data("fashion-mnist", fraction, "noise", num_train=NUM_IMAGES, seed=SEED)
        clean = load_experiment_data("fashion-mnist", 0.0, "noise", num_train=NUM_IMAGES, seed=SEED)
        flags = data.train.is_contaminated
        images = clean.train.images.clone()
        images[flags] = -images[flags]
        return images, flags
    data = load_experiment_data("fashion-mnist", fraction, kind, num_train=NUM_IMAGES, seed=SEED)
    # The kit's gaussian kind is not clipped (x + 0.5 n exactly); an image file is, and so is the audit's input.
    return data.train.images.clamp(-1.0, 1.0), data.train.is_contaminated


def run_dir(out: Path, run: Run) -> Path:
    return out / run.name


def audit_command(run: Run, out: Path, steps: int, threads: int | None) -> list:
    folder = run_dir(out, run)
    command = [sys.executable, "-m", "robust_diffusion.audit", str(folder / "images.npy"), "--out",
               str(folder / "audit"), "--steps", str(steps), "--score-from-step", str(SCORE_FROM_STEP),
               "--seed", str(SEED), "--labels", str(folder / "labels.npy"), "--resume", "--no-progress",
               "--device", "cpu"]
    return command + (["--threads", str(threads)] if threads else [])


def score(ranking_csv: Path, labels: np.ndarray) -> dict:
    """AUROC and precision at k of the audit's ranking (by mean influence, low first) and of the baseline
    (by mean penalty, high first)."""
    from robust_diffusion.training.metrics import auroc
    with open(ranking_csv) as f:
        rows = list(csv.DictReader(f))
    index = torch.tensor([int(r["index"]) for r in rows])
    influence = torch.tensor([float(r["mean_influence"] or "nan") for r in rows], dtype=torch.float64)
    penalty = torch.tensor([float(r["mean_penalty"] or "nan") for r in rows], dtype=torch.float64)
    truth = torch.as_tensor(labels, dtype=torch.bool)[index]
    k = int(truth.sum())
    seen = ~torch.isnan(influence)
    by_penalty = torch.argsort(torch.nan_to_num(penalty, nan=-float("inf")), descending=True, stable=True)
    return {"k": k, "seen": int(seen.sum()),
            "auroc": auroc(-influence[seen], truth[seen]),
            "precision": float(truth[:k].float().mean()),  # ranking.csv is in rank order, least trusted first
            "baseline_auroc": auroc(penalty[seen], truth[seen]),
            "baseline_precision": float(truth[by_penalty[:k]].float().mean())}


def run_one(run: Run, out: Path, threads: int | None) -> list:
    """Every budget of one run (resuming what is on disk); one result row per budget."""
    folder = run_dir(out, run)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "labels.npy").is_file():
        images, flags = contaminated_images(run.kind, run.fraction)
        np.save(folder / "images.npy", images.numpy().astype(np.float32))
        np.save(folder / "labels.npy", flags.numpy().astype(np.uint8))
    labels = np.load(folder / "labels.npy")
    rows = []
    for steps in BUDGETS:
        result = folder / f"budget{steps}.csv"
        if not result.is_file():
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(threads or 1))
            started = time.time()
            with open(folder / "log.txt", "a") as log:
                subprocess.run(audit_command(run, out, steps, threads), check=True, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
            scored = score(folder / "audit" / "ranking.csv", labels)
            scored["wall_s"] = time.time() - started
            with open(result, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(scored))
                writer.writeheader()
                writer.writerow(scored)
        with open(result) as f:
            row = next(csv.DictReader(f))
        rows.append({"run": run.name, "kind": run.kind, "fraction": run.fraction, "steps": steps, **row})
    return rows


def collect(out: Path) -> list:
    rows = []
    for run in (Run(k, p) for k in KINDS for p in FRACTIONS):
        for steps in BUDGETS:
            path = run_dir(out, run) / f"budget{steps}.csv"
            if path.is_file():
                with open(path) as f:
                    rows.append({"run": run.name, "kind": run.kind, "fraction": run.fraction, "steps": steps,
                                 **next(csv.DictReader(f))})
    return rows


def tables(rows: list) -> str:
    """The markdown table of every scored budget, cumulative wall minutes per run."""
    lines = ["| contamination | steps | minutes | audit AUROC | audit precision@k | baseline AUROC | "
             "baseline precision@k | k |", "|---|---|---|---|---|---|---|---|"]
    spent = {}
    for row in rows:
        spent[row["run"]] = spent.get(row["run"], 0.0) + float(row["wall_s"])
        lines.append(f"| {row['kind']} {float(row['fraction']):g} | {row['steps']} | {spent[row['run']] / 60:.1f} | "
                     f"{float(row['auroc']):.3f} | {float(row['precision']):.3f} | "
                     f"{float(row['baseline_auroc']):.3f} | {float(row['baseline_precision']):.3f} | {row['k']} |")
    return "\n".join(lines)


def write_tables(rows: list, path: Path = AUDIT_MD) -> None:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    stamp = (f"Written by `python examples/audit_evidence.py` on {datetime.date.today()} ({platform.machine()} CPU, "
             f"{os.cpu_count()} cores, torch {torch.__version__}); minutes: wall time of the audit runs so far.")
    path.write_text(f"{head}{BEGIN}\n{stamp}\n\n{tables(rows)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "audit-evidence")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per audit")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        runs = [Run(k, p) for p in FRACTIONS for k in KINDS]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for rows in pool.map(lambda run: run_one(run, args.out, args.threads), runs):
                print(tables(rows), flush=True)
    write_tables(collect(args.out))
    print(f"tables written to {AUDIT_MD}")


if __name__ == "__main__":
    main()
