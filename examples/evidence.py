"""The evidence grid of docs/RESULTS.md: every (cell, seed) of its protocol (the first cells fixed before any
result was seen, later ones marked there as added, with their rules and whether git shows each rule before its
results), run with examples/cifar10_contaminated.py, then aggregated into the tables of docs/RESULTS.md.

    python examples/evidence.py                      # run what is missing (resumable), then write the tables
    python examples/evidence.py --jobs 2 --threads 1 # two single-thread runs at a time (a 2-core CPU)
    python examples/evidence.py --only clean noise-0.3 --seeds 0
    python examples/evidence.py --report-only        # tables from the runs on disk, nothing trained
    python examples/evidence.py --preset full --only noise-0.3 gaussian-0.3   # the larger budget (a GPU)

A (cell, seed) is done when its folder under --out holds results.csv; unfinished ones are run again (the
example resumes interrupted trainings). The tables mark cells that are not done yet instead of leaving
them out. Every run shares one cache of evaluation networks, so all are judged by the same ones. Each
table names the machine its runs say they ran on; another preset's tables get their own section.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cifar10_contaminated.py"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- evidence-tables:begin -->", "<!-- evidence-tables:end -->"


def markers(preset: str) -> tuple:
    """The comments that delimit a preset's generated tables in docs/RESULTS.md (quick: the protocol's)."""
    return (BEGIN, END) if preset == "quick" else (f"<!-- evidence-tables:{preset}:begin -->",
                                                    f"<!-- evidence-tables:{preset}:end -->")

BASELINES = ["kl", "hellinger", "ned", "alpha", "huber", "pseudo_huber", "clipped_mse"]
DIVERGENCES = ["hellinger", "ned", "alpha"]


@dataclass(frozen=True)
class Cell:
    name: str
    contamination: float
    kind: str
    losses: tuple
    scale: str = "adaptive"
    question: str = ""
    steps: int | None = None  # training steps per loss (default: the preset's)
    temperature: float = 1.0  # the adaptive scale's tau
    objective: str = "ddpm"  # or "flow": flow matching with SD3's logit-normal times (FLOW_SAMPLING)
    seeds: tuple = (0, 1)  # the protocol's two seeds; the cells that decide by paired intervals run PAIRED_SEEDS
    preset: str | None = None  # the example's preset when not the grid's (the main job's "demo")
    rare_class: int | None = None  # a class kept at rare_fraction of the training images (the rare-truths control)
    rare_fraction: float = 0.03
    samples: int | None = None  # generated samples per loss (default: the preset's)


# The rule (docs/RESULTS.md, Protocol; committed together with its cells' results) that decides whether
# scale="batch" becomes the default of the bounded-influence divergences' functional losses.
BATCH_RULE_LOSSES = ("hellinger", "ned")
BATCH_RULE_AUROC_TOLERANCE = 0.05  # at p > 0, influence AUROC at most 0.05 below the adaptive scale's
BATCH_RULE_FD_TOLERANCE = 0.05  # everywhere, FD at most 5% above the adaptive scale's

#: Seeds of the cells whose rule reads paired differences with 95% intervals (at least five).
PAIRED_SEEDS = (0, 1, 2, 3, 4)

# The rule, fixed before its cells ran (docs/RESULTS.md, Protocol, "Rare-truths rule"): the class kept rare, the
# losses compared (the standard MSE, today's recipe, then the candidates) and the targets.
RARE_CLASS = 1  # Trouser
RARE_LOSSES = ("mse", "ned+trust", "kl+trust+coherent", "ned+trust+coherent")
RARE_LOSSES_DEMO = ("mse", "ned+trust", "ned+trust+coherent")  # the second round: the candidate that kept the gains
RARE_KEEP = 0.8  # a candidate keeps at least 80% of the MSE's mean confident share of the rare class
RARE_INFORMATIVE = 0.005  # a cell where the MSE's mean confident share is below 0.5% cannot test that

# The rule, fixed before its cells ran (docs/RESULTS.md, Protocol, "Influence normalisation rule"), that decides
# RobustDiffusionLoss's default normalize_influence.
NORMALIZATION_LOSS = "ned"
NORMALIZATION_FD_TOLERANCE = 0.05  # on every kind, the upper 95% bound of the mean paired FD change below +5%
NORMALIZATION_CONTAMINANT_TOLERANCE = 0.02  # on contaminated kinds, that of the contaminant fraction at most +0.02

# The protocol, in the order it is run (the first cells answer the main questions).
CELLS = [
    Cell("noise-0.3", 0.3, "noise", tuple(BASELINES), question="robustness to noise images"),
    Cell("gaussian-0.3", 0.3, "gaussian", tuple(BASELINES + ["kl+risk_free", "ned+risk_free"]),
         question="robustness to known-std Gaussian noise; risk-free loss vs standard"),
    Cell("clean", 0.0, "noise", tuple(BASELINES + ["kl+debias", "ned+debias"]),
         question="the cost on clean data; constant vs debias weighting"),
    Cell("noise-0.3-scale1", 0.3, "noise", tuple(DIVERGENCES), scale="1.0", question="fixed scale 1 vs adaptive"),
    Cell("gaussian-0.3-scale1", 0.3, "gaussian", tuple(DIVERGENCES), scale="1.0",
         question="fixed scale 1 vs adaptive"),
    Cell("noise-0.3-vlb", 0.3, "noise", tuple(DIVERGENCES), scale="vlb", question="DDPM's lambda_t scale vs adaptive"),
    Cell("gaussian-0.3-vlb", 0.3, "gaussian", tuple(DIVERGENCES), scale="vlb",
         question="DDPM's lambda_t scale vs adaptive"),
    # Added after the cells above had run (their seed spread is as large as the gaps between losses): the
    # main comparison at six times the training budget.
    Cell("noise-0.3-1500steps", 0.3, "noise", ("kl", "ned", "pseudo_huber"), steps=1500,
         question="the main comparison at 6x the budget"),
    Cell("gaussian-0.3-1500steps", 0.3, "gaussian", ("kl", "ned", "pseudo_huber"), steps=1500,
         question="the main comparison at 6x the budget"),
    Cell("noise-0.1", 0.1, "noise", tuple(BASELINES), question="robustness at a lower contamination"),
    Cell("gaussian-0.1", 0.1, "gaussian", tuple(BASELINES), question="robustness at a lower contamination"),
    # Added after all cells above had run. Every loss above, KL included, trains at the adaptive scale, which
    # for KL means MSE divided by the running median penalty of the sample's noise level: a timestep
    # reweighting, not the standard MSE. The `-mse` cells train the standard MSE (kl at scale 1 is
    # F.mse_loss) on the same data; the `tau` cells ask whether a lower temperature (contaminants weigh
    # less) halves the contaminant fraction on noise images, where tau = 1 did not; `clean-1500steps` asks
    # whether the clean-data cost of the 250-step cells shrinks with the budget that made NED pay off.
    Cell("noise-0.3-mse", 0.3, "noise", ("kl",), scale="1.0", question="standard MSE: kl at scale 1"),
    Cell("gaussian-0.3-mse", 0.3, "gaussian", ("kl",), scale="1.0", question="standard MSE: kl at scale 1"),
    Cell("clean-mse", 0.0, "noise", ("kl",), scale="1.0", question="standard MSE: kl at scale 1"),
    Cell("noise-0.3-tau0.5", 0.3, "noise", ("hellinger", "ned"), temperature=0.5,
         question="adaptive scale with temperature 0.5 instead of 1"),
    Cell("noise-0.3-tau0.25", 0.3, "noise", ("hellinger", "ned"), temperature=0.25,
         question="adaptive scale with temperature 0.25 instead of 1"),
    Cell("noise-0.3-1500steps-mse", 0.3, "noise", ("kl",), scale="1.0", steps=1500,
         question="standard MSE at 6x the budget"),
    Cell("gaussian-0.3-1500steps-mse", 0.3, "gaussian", ("kl",), scale="1.0", steps=1500,
         question="standard MSE at 6x the budget"),
    Cell("clean-1500steps", 0.0, "noise", ("kl", "ned"), steps=1500, question="the cost on clean data at 6x the budget"),
    Cell("clean-1500steps-mse", 0.0, "noise", ("kl",), scale="1.0", steps=1500, question="standard MSE at 6x the budget"),
    # Added after the cells above had run: temperature 0.25, which halved NED's contaminant fraction at 250
    # steps on noise images, at the budget of the main comparison on both kinds.
    Cell("noise-0.3-1500steps-tau0.25", 0.3, "noise", ("ned",), steps=1500, temperature=0.25,
         question="temperature 0.25 at 6x the budget"),
    Cell("gaussian-0.3-1500steps-tau0.25", 0.3, "gaussian", ("ned",), steps=1500, temperature=0.25,
         question="temperature 0.25 at 6x the budget"),
    Cell("clean-1500steps-tau0.25", 0.0, "noise", ("ned",), steps=1500, temperature=0.25,
         question="temperature 0.25 at 6x the budget, on clean data"),
    # Added after the cells above had run, with the rule that decides the default temperature written down
    # first (docs/RESULTS.md, protocol; `temperature_rule` below applies it): temperature 0.25 where it was
    # still untested, i.e. at 250 steps on Gaussian noise and clean data, and for Hellinger at 1500 steps
    # (which had not run at 1500 steps at all, so temperature 1 as well).
    Cell("gaussian-0.3-tau0.25", 0.3, "gaussian", ("hellinger", "ned"), temperature=0.25,
         question="adaptive scale with temperature 0.25 instead of 1"),
    Cell("clean-tau0.25", 0.0, "noise", ("hellinger", "ned"), temperature=0.25,
         question="adaptive scale with temperature 0.25 instead of 1, on clean data"),
    Cell("noise-0.3-1500steps-hellinger", 0.3, "noise", ("hellinger",), steps=1500,
         question="Hellinger at 6x the budget"),
    Cell("noise-0.3-1500steps-hellinger-tau0.25", 0.3, "noise", ("hellinger",), steps=1500, temperature=0.25,
         question="Hellinger, temperature 0.25 at 6x the budget"),
    Cell("gaussian-0.3-1500steps-hellinger", 0.3, "gaussian", ("hellinger",), steps=1500,
         question="Hellinger at 6x the budget"),
    Cell("gaussian-0.3-1500steps-hellinger-tau0.25", 0.3, "gaussian", ("hellinger",), steps=1500,
         temperature=0.25, question="Hellinger, temperature 0.25 at 6x the budget"),
    Cell("clean-1500steps-hellinger", 0.0, "noise", ("hellinger",), steps=1500,
         question="Hellinger at 6x the budget, on clean data"),
    Cell("clean-1500steps-hellinger-tau0.25", 0.0, "noise", ("hellinger",), steps=1500, temperature=0.25,
         question="Hellinger, temperature 0.25 at 6x the budget, on clean data"),
    # Added after the cells above had run: the debias weighting failed at 250 steps (the noisiest timesteps
    # dominate the loss and the last denoising steps are not learnt); its paper trains far longer.
    Cell("clean-1500steps-debias", 0.0, "noise", ("kl+debias", "ned+debias"), steps=1500,
         question="constant vs debias weighting at 6x the budget"),
    # Added after the cells above had run, with the rule that decides (docs/RESULTS.md, Protocol, "Rule for a
    # stateless default scale", committed with these cells' results; `batch_scale_rule` applies it): the stateless
    # scale="batch" (no running state, so the functional losses can have it) against the adaptive scale of
    # noise-0.3, gaussian-0.3 and clean.
    Cell("noise-0.3-batch", 0.3, "noise", BATCH_RULE_LOSSES, scale="batch", question="stateless batch scale"),
    Cell("gaussian-0.3-batch", 0.3, "gaussian", BATCH_RULE_LOSSES, scale="batch", question="stateless batch scale"),
    Cell("clean-batch", 0.0, "noise", BATCH_RULE_LOSSES, scale="batch",
         question="stateless batch scale, on clean data"),
    # Added after the cells above had run, the reading rule written first (docs/RESULTS.md, Protocol,
    # "Flow-matching cells"): the main comparison with flow matching instead of DDPM.
    Cell("flow-noise-0.3", 0.3, "noise", ("mse", "kl", "hellinger", "ned", "pseudo_huber"), objective="flow",
         question="flow matching: robustness to noise images"),
    Cell("flow-gaussian-0.3", 0.3, "gaussian", ("mse", "kl", "hellinger", "ned", "pseudo_huber"), objective="flow",
         question="flow matching: robustness to known-std Gaussian noise"),
    # Added after the cells above had run, with the rule written first (docs/RESULTS.md, Protocol, "Influence
    # normalisation rule"; `normalization_rule` applies it): NED at the module's defaults with and without the
    # loss divided by the batch's mean influence weight, five seeds, paired.
    *(Cell(f"{name}-normalized", p, kind, (NORMALIZATION_LOSS, f"{NORMALIZATION_LOSS}+normalized"),
           seeds=PAIRED_SEEDS, question="normalize_influence: the loss divided by the batch's mean influence weight")
      for name, p, kind in (("noise-0.3", 0.3, "noise"), ("gaussian-0.3", 0.3, "gaussian"), ("clean", 0.0, "noise"))),
    # Added with the rule written first (docs/RESULTS.md, Protocol, "Demo ablation"; `demo_ablation` reads it): the
    # main job's recipe and what each of its ingredients adds, and the strongest baseline a user could configure,
    # at the main job's budget, five seeds, paired.
    Cell("demo-tau0.25", 0.3, "noise", ("mse", "pseudo_huber", "ned", "ned+trust"), temperature=0.25, preset="demo",
         seeds=PAIRED_SEEDS, question="the main job's recipe, its ablation and the strongest baseline"),
    Cell("demo-tau1", 0.3, "noise", ("kl", "ned"), preset="demo", seeds=PAIRED_SEEDS,
         question="the main job's ablation at temperature 1"),
    # Added with the rule written first (docs/RESULTS.md, Protocol, "Rare-truths rule"; `rare_truths_rule` applies
    # it): a legitimately rare class, on clean data and beside noise images, under today's recipe and two
    # candidates that gate its trust by coherence; five seeds, paired, 1,000 samples a loss.
    *(Cell(name, p, "noise", RARE_LOSSES, temperature=0.25, seeds=PAIRED_SEEDS, rare_class=RARE_CLASS,
           rare_fraction=0.03, samples=1000, question=question)
      for name, p, question in (("rare-3", 0.0, "Trouser at 3% of clean data: does the recipe keep a rare class?"),
                                ("rare-3-noise-0.3", 0.3, "Trouser at 3% beside 30% noise images"))),
    # Added with the rule written first (docs/RESULTS.md, Protocol, "Trust beyond noise images"): trust against no
    # trust on the kinds it was not designed on, and on clean data, five seeds, paired.
    *(Cell(f"trust-{name}", p, kind, ("ned", "ned+trust"), temperature=0.25, seeds=PAIRED_SEEDS, objective=objective,
           question="per-sample trust on a kind it was not designed on")
      for name, p, kind, objective in (("gaussian-0.3", 0.3, "gaussian", "ddpm"), ("dataset-0.3", 0.3, "dataset", "ddpm"),
                                       ("flow-noise-0.3", 0.3, "noise", "flow"), ("clean", 0.0, "noise", "ddpm"))),
    # The second round, its rule written after the first round's verdict and before its runs (docs/RESULTS.md,
    # Protocol, "Rare-truths rule, second round"): the main job's budget, the candidate that kept the gains.
    *(Cell(f"{name}-demo", p, "noise", RARE_LOSSES_DEMO, temperature=0.25, seeds=PAIRED_SEEDS, preset="demo",
           rare_class=RARE_CLASS, rare_fraction=0.03, samples=1000, question=f"{question}, at the main job's budget")
      for name, p, question in (("rare-3", 0.0, "Trouser at 3% of clean data"),
                                ("rare-3-noise-0.3", 0.3, "Trouser at 3% beside 30% noise images"))),
]
#: The ablation of the main job's recipe: (what is added, the (cell, loss) without it, the (cell, loss) with it).
ABLATION = (
    ("the adaptive scale (KL, normalised per noise level)", ("demo-tau0.25", "mse"), ("demo-tau1", "kl")),
    ("the divergence (NED instead of KL)", ("demo-tau1", "kl"), ("demo-tau1", "ned")),
    ("temperature 0.25 instead of 1", ("demo-tau1", "ned"), ("demo-tau0.25", "ned")),
    ("per-sample trust", ("demo-tau0.25", "ned"), ("demo-tau0.25", "ned+trust")),
    ("the whole recipe, against the standard MSE", ("demo-tau0.25", "mse"), ("demo-tau0.25", "ned+trust")),
    ("the whole recipe, against pseudo-Huber at the adaptive scale and temperature 0.25",
     ("demo-tau0.25", "pseudo_huber"), ("demo-tau0.25", "ned+trust")),
)
#: Every seed some cell runs.
SEEDS = tuple(sorted({seed for cell in CELLS for seed in cell.seeds}))
#: How the flow-matching cells draw training times (diffusers' SD3 script's default weighting_scheme).
FLOW_SAMPLING = "logit_normal"


def preset_cells(preset: str) -> list:
    """The cells a preset runs. A cell's `steps` is a multiple of the quick budget; another preset trains
    every cell at its own budget, so the cells that only change the steps would repeat their twins."""
    return list(CELLS) if preset == "quick" else [cell for cell in CELLS if cell.steps is None and cell.preset is None]


def machine(out: Path, cell: Cell, seeds: list) -> str:
    """The machine the runs of a cell name in their results.md (the current one for runs that predate it)."""
    for seed in seeds:
        path = run_dir(out, cell, seed) / "results.md"
        for line in path.read_text().splitlines() if path.is_file() else []:
            if line.startswith("- machine: "):
                return line[len("- machine: "):]
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / cell.name / f"seed{seed}"


def command(cell: Cell, seed: int, out: Path, preset: str, threads: int | None) -> list:
    cmd = [sys.executable, str(EXAMPLE), "--dataset", "fashion-mnist", "--preset", cell.preset or preset,
           "--contamination", str(cell.contamination), "--kind", cell.kind, "--losses", *cell.losses,
           "--scale", cell.scale, "--seed", str(seed), "--out", str(run_dir(out, cell, seed)),
           "--eval-cache", str(out / "eval_cache"), "--resume", "--no-export"]
    cmd += ["--steps", str(cell.steps)] if cell.steps else []
    # a preset of its own may set another temperature (the demo's 0.25): the cell's is then always passed
    cmd += ["--temperature", str(cell.temperature)] if cell.temperature != 1.0 or cell.preset else []
    cmd += ["--jobs", "1"] if cell.preset else []  # the grid runs jobs side by side, not the example
    cmd += ["--objective", "flow", "--timestep-sampling", FLOW_SAMPLING] if cell.objective == "flow" else []
    cmd += ["--rare-class", str(cell.rare_class), "--rare-fraction", str(cell.rare_fraction)] \
        if cell.rare_class is not None else []
    cmd += ["--samples", str(cell.samples)] if cell.samples else []
    return cmd + (["--threads", str(threads)] if threads else [])


def run_one(cell: Cell, seed: int, args) -> tuple:
    folder = run_dir(args.out, cell, seed)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.call(command(cell, seed, args.out, args.preset, args.threads), stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"))
    minutes = (time.perf_counter() - t0) / 60
    print(f"{cell.name} seed {seed}: {'done' if code == 0 else f'FAILED (exit {code}, see {folder}/log.txt)'} "
          f"in {minutes:.1f} min", flush=True)
    return cell.name, seed, code, minutes


def read_rows(out: Path) -> dict:
    """{(cell, loss): {seed: row}} of every finished run."""
    rows = {}
    for cell in CELLS:
        for seed in cell.seeds:
            path = run_dir(out, cell, seed) / "results.csv"
            if path.is_file():
                with open(path) as f:
                    for row in csv.DictReader(f):
                        rows.setdefault((cell.name, row["loss"]), {})[seed] = row
    return rows


def stat(values: list) -> str:
    """Mean over seeds, with the seeds' values when there are several."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ({', '.join(f'{v:.3g}' for v in values)})"


def number(row: dict, key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else math.nan


def kl_cell(cell: Cell) -> Cell:
    """The cell whose `kl` runs a cell is compared with: the adaptive-scale, temperature-1 cell with the same
    data and budget that trains `kl` (itself, when it is one, or when there is none, as for the rare-class cells)."""
    return next((c for c in CELLS if "kl" in c.losses and c.scale == "adaptive" and c.temperature == 1.0
                 and (c.contamination, c.kind, c.steps, c.objective, c.preset, c.rare_class)
                 == (cell.contamination, cell.kind, cell.steps, cell.objective, cell.preset, cell.rare_class)), cell)


def accuracies(rows: dict, cell: Cell) -> str:
    """" Evaluation networks' test accuracy: ..." from the cell's runs (empty for runs that predate the columns)."""
    for loss in cell.losses:
        for row in rows.get((cell.name, loss), {}).values():
            feature, judge = number(row, "classifier_accuracy"), number(row, "judge_accuracy")
            if not math.isnan(feature):
                return (f" Evaluation networks' test accuracy: feature classifier {feature:.3f}, class judge "
                        f"{judge:.3f}.")
    return ""


def sections(block: str) -> dict:
    """{cell name: its section's text} of a generated tables block."""
    parts = ("\n" + block).split("\n### ")[1:]
    return {part.split(":", 1)[0]: "### " + part.rstrip("\n") + "\n" for part in parts}


def kept_kl(section: str) -> dict:
    """{seed: {"frechet_distance": value}} of the `kl` row of a kept table (3 significant digits), so cells
    run later are still compared with the KL runs whose folders are gone."""
    done = next((line for line in section.splitlines() if line.startswith("Seeds done: ")), "")
    seeds = [int(s) for s in done[len("Seeds done: "):].split(" of ")[0].split(",") if s.strip()] if done else []
    values = parse_rows(section).get("kl", {}).get("fd", [])
    return {seed: {"frechet_distance": str(v)} for seed, v in zip(seeds, values)} if len(values) == len(seeds) else {}


def tables(out: Path, kept: dict | None = None, cells: list | None = None) -> str:
    """The tables of every cell (of `cells`, default all) from its runs in `out`; a cell with no runs there
    keeps its section from `kept` (the previous tables) when that has numbers, so results survive the run
    folders."""
    rows = read_rows(out)
    kept = kept or {}
    lines = []
    for cell in CELLS if cells is None else cells:
        done = [seed for seed in cell.seeds if (run_dir(out, cell, seed) / "results.csv").is_file()]
        if not done and cell.name in kept and "Not run yet." not in kept[cell.name]:
            lines += kept[cell.name].split("\n")
            continue
        scale = "" if cell.scale == "adaptive" else f", scale {cell.scale}"
        steps = f", {cell.steps} steps" if cell.steps else ""
        temperature = f", temperature {cell.temperature}" if cell.temperature != 1.0 else ""
        steps += f", flow matching ({FLOW_SAMPLING} times, Euler)" if cell.objective == "flow" else ""
        steps += f", the `{cell.preset}` preset" if cell.preset else ""
        steps += f", class {cell.rare_class} at {cell.rare_fraction:g}" if cell.rare_class is not None else ""
        steps += f", {cell.samples} samples" if cell.samples else ""
        lines += [f"### {cell.name}: p = {cell.contamination}, {cell.kind}{scale}{temperature}{steps} "
                  f"({cell.question})", ""]
        if not done:
            lines += ["Not run yet.", ""]
            continue
        rare = cell.rare_class is not None
        lines += [f"Seeds done: {', '.join(map(str, done))} of {', '.join(map(str, cell.seeds))}, tabulated "
                  f"{datetime.date.today().isoformat()} ({machine(out, cell, done)}). Mean over seeds "
                  "(each seed's value in brackets). FD: Frechet distance in the evaluation classifier's "
                  "features (lower is better); recall, coverage: the share of the test images' variety the "
                  "samples reach, in the same features; class TV: how far the class judge's histogram of the "
                  "samples is from the training set's (0: the same); hybrid: the contaminant fraction by the "
                  "hybrid-aware detector; blank for runs that predate them; vs KL: "
                  "relative FD change against `kl` of the same seeds"
                  f"{'' if kl_cell(cell) is cell else f' in `{kl_cell(cell).name}`'}.{accuracies(rows, cell)}"
                  + (" Rare share: the samples the class judge assigns to the rare class (confident: with "
                     "probability above 0.9); rare AUROC: how well a low mean influence weight picks out the rare "
                     "class's training images (0.5: not at all)." if rare else ""), "",
                  "| loss | FD | vs KL | contaminant fraction | influence AUROC | train s | recall | coverage | "
                  "class TV | hybrid |" + (" rare share | rare confident | rare AUROC |" if rare else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if rare else "")]
        kl = rows.get((kl_cell(cell).name, "kl"), {}) or kept_kl(kept.get(kl_cell(cell).name, ""))
        data_rows = ["data: clean training images", "data: contaminated training set"] if "kl" in cell.losses else []
        for loss in list(cell.losses) + data_rows:
            by_seed = rows.get((cell.name, loss), {})
            if not by_seed:
                lines.append(f"| {loss} | not run | | | | | | | | |" + (" | | |" if rare else ""))
                continue
            seeds = sorted(by_seed)
            fd = [number(by_seed[s], "frechet_distance") for s in seeds]
            rel = [number(by_seed[s], "frechet_distance") / number(kl[s], "frechet_distance") - 1
                   for s in seeds if s in kl] if not loss.startswith("data") and (loss, cell) != ("kl", kl_cell(cell)) \
                and all(s in kl for s in seeds) else []  # blank where KL lacks some of the seeds
            rel_text = (f"{100 * statistics.mean(rel):+.0f}%" if rel else "")
            lines.append(f"| {loss} | {stat(fd)} | {rel_text} | "
                         f"{stat([number(by_seed[s], 'contaminant_fraction') for s in seeds])} | "
                         f"{stat([number(by_seed[s], 'auroc') for s in seeds])} | "
                         f"{stat([number(by_seed[s], 'train_s') for s in seeds])} | "
                         + " | ".join(stat([number(by_seed[s], key) for s in seeds])
                                      for key in ("recall", "coverage", "class_tv", "contaminant_fraction_hybrid")
                                      + (("rare_share", "rare_confident", "rare_auroc") if rare else ())) + " |")
        lines.append("")
    return "\n".join(lines)


# The cells the summary figure shows, one panel each; a panel also shows the standard-MSE cell of its data.
FIGURE_CELLS = ["noise-0.3", "gaussian-0.3", "clean", "noise-0.1", "gaussian-0.1", "noise-0.3-1500steps",
                "gaussian-0.3-1500steps", "clean-1500steps"]


def parse_rows(section: str) -> dict:
    """{loss: {"fd": [per-seed values], "contaminant": [...], "fd_mean": the printed mean, "contaminant_mean":
    ...}} of one generated table section."""
    def values(cell: str) -> list:
        cell = cell.strip()
        if not cell:
            return []
        if "(" in cell:  # "mean (seed0, seed1)"
            return [float(v) for v in cell.split("(", 1)[1].rstrip(")").split(",")]
        return [float(cell)]

    def printed(cell: str) -> float:  # the table's mean (what a reader sees, not re-rounded seed values)
        return float(cell.split("(")[0]) if cell.strip() else math.nan

    rows = {}
    for line in section.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) < 4 or parts[0] in ("loss", "") or parts[0].startswith(("---", "data:")) or parts[1] == "not run":
            continue
        rows[parts[0]] = {"fd": values(parts[1]), "contaminant": values(parts[3]),
                          "coverage": values(parts[7]) if len(parts) > 7 else [],
                          "fd_mean": printed(parts[1]), "contaminant_mean": printed(parts[3]),
                          "auroc_mean": printed(parts[4]) if len(parts) > 4 else math.nan,
                          "rare_confident": values(parts[11]) if len(parts) > 12 else []}
    return rows


# The rule, fixed before its last cells ran (docs/RESULTS.md, protocol), that decides whether the
# divergences' default temperature becomes RULE_TEMPERATURE.
RULE_LOSSES = ("hellinger", "ned")
RULE_TEMPERATURE = 0.25
RULE_CLEAN_FD_TOLERANCE = 0.05  # at p = 0, FD at most 5% higher
RULE_CONTAMINANT_TOLERANCE = 0.02  # at p > 0, contaminant fraction at most 0.02 higher


def temperature_pairs() -> list:
    """(loss, cell at RULE_TEMPERATURE, the same data, budget and loss at temperature 1) for every pair the
    temperature rule compares."""
    pairs = []
    for cell in CELLS:
        if cell.scale != "adaptive" or cell.temperature != RULE_TEMPERATURE or cell.seeds != (0, 1) or cell.preset:
            continue  # the rule reads the protocol's two-seed cells, not the paired cells added after it
        for loss in (l for l in cell.losses if l in RULE_LOSSES):
            reference = next(c for c in CELLS if c.scale == "adaptive" and c.temperature == 1.0 and loss in c.losses
                             and (c.contamination, c.kind, c.steps) == (cell.contamination, cell.kind, cell.steps))
            pairs.append((loss, cell, reference))
    return pairs


def temperature_rule(block: str) -> str:
    """The rule's table and verdict, from the generated tables `block` (means over seeds)."""
    found = sections(block)
    lines = [f"### Temperature rule: {RULE_TEMPERATURE:g} against 1 for {', '.join(RULE_LOSSES)} "
             "(the protocol's rule, applied by `temperature_rule`)", "",
             f"| loss | pair | FD at 1 | FD at {RULE_TEMPERATURE:g} | ratio | contaminant fraction at 1 | "
             f"at {RULE_TEMPERATURE:g} | holds |", "|---|---|---|---|---|---|---|---|"]
    ratios, failures, missing = {loss: [] for loss in RULE_LOSSES}, [], []
    for loss, cell, reference in temperature_pairs():
        low = parse_rows(found.get(cell.name, "")).get(loss)
        high = parse_rows(found.get(reference.name, "")).get(loss)
        if not (low and high and low["fd"] and high["fd"]):
            missing.append(f"{loss} {cell.name}")
            lines.append(f"| {loss} | {cell.name} vs {reference.name} | not run | | | | | |")
            continue
        ratio = low["fd_mean"] / high["fd_mean"]
        ratios[loss].append(ratio)
        if cell.contamination == 0:
            holds = ratio <= 1 + RULE_CLEAN_FD_TOLERANCE
            why = f"FD +{100 * (ratio - 1):.0f}% on clean data"
        else:
            holds = low["contaminant_mean"] - high["contaminant_mean"] <= RULE_CONTAMINANT_TOLERANCE
            why = "more contaminant-like samples"
        if not holds:
            failures.append(f"{loss} {cell.name}: {why}")
        lines.append(f"| {loss} | {cell.name} vs {reference.name} | {high['fd_mean']:.3g} | {low['fd_mean']:.3g} | "
                     f"{ratio:.3f} | {high['contaminant_mean']:.3g} | {low['contaminant_mean']:.3g} | "
                     f"{'yes' if holds else 'no'} |")
    lines.append("")
    for loss, values in ratios.items():
        if not values:
            continue
        wins = sum(r < 1 for r in values)
        geometric = math.exp(sum(map(math.log, values)) / len(values))
        lines.append(f"- {loss}: lower FD at {RULE_TEMPERATURE:g} in {wins} of {len(values)} pairs, geometric-mean "
                     f"FD ratio {geometric:.3f}.")
        if not (wins > len(values) / 2 and geometric < 1):
            failures.append(f"{loss}: not better on balance")
    if missing:
        verdict = f"undecided: {len(missing)} pair(s) not run yet ({'; '.join(missing)})"
    elif failures:
        verdict = f"the default stays 1 ({'; '.join(failures)})"
    else:
        verdict = f"every condition holds: the divergences' default temperature becomes {RULE_TEMPERATURE:g}"
    lines += [f"- Verdict: {verdict}.", ""]
    return "\n".join(lines)


def batch_scale_rule(block: str) -> str:
    """The stateless scale's rule: its table and verdict, from the generated tables `block` (means over seeds)."""
    found = sections(block)
    lines = ["### Batch-scale rule: scale='batch' against the adaptive scale for " + ", ".join(BATCH_RULE_LOSSES)
             + " (the protocol's rule, applied by `batch_scale_rule`)", "",
             "| loss | pair | FD adaptive | FD batch | ratio | AUROC adaptive | AUROC batch | holds |",
             "|---|---|---|---|---|---|---|---|"]
    failures, missing = [], []
    for cell in (c for c in CELLS if c.scale == "batch"):
        reference = next(c for c in CELLS if c.contamination == cell.contamination and c.kind == cell.kind
                         and c.scale == "adaptive" and c.steps is None and c.temperature == 1.0)
        for loss in cell.losses:
            batch = parse_rows(found.get(cell.name, "")).get(loss)
            adaptive = parse_rows(found.get(reference.name, "")).get(loss)
            if not (batch and adaptive and batch["fd"] and adaptive["fd"]):
                missing.append(f"{loss} {cell.name}")
                lines.append(f"| {loss} | {cell.name} vs {reference.name} | not run | | | | | |")
                continue
            ratio = batch["fd_mean"] / adaptive["fd_mean"]
            holds = ratio <= 1 + BATCH_RULE_FD_TOLERANCE
            if cell.contamination > 0:
                holds = holds and batch["auroc_mean"] >= adaptive["auroc_mean"] - BATCH_RULE_AUROC_TOLERANCE
            if not holds:
                failures.append(f"{loss} {cell.name}")
            auroc = (f"{adaptive['auroc_mean']:.3g} | {batch['auroc_mean']:.3g}" if cell.contamination > 0
                     else " | ")
            lines.append(f"| {loss} | {cell.name} vs {reference.name} | {adaptive['fd_mean']:.3g} | "
                         f"{batch['fd_mean']:.3g} | {ratio:.3f} | {auroc} | {'yes' if holds else 'no'} |")
    if missing:
        verdict = f"undecided: {len(missing)} pair(s) not run yet ({'; '.join(missing)})"
    elif failures:
        verdict = f"the functional default stays scale=1.0 (fails: {'; '.join(failures)})"
    else:
        verdict = "every condition holds: scale='batch' becomes the bounded divergences' functional default"
    lines += ["", f"- Verdict: {verdict}.", ""]
    return "\n".join(lines)


# Two-sided 97.5% quantiles of Student's t for 1-30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(differences: list) -> tuple:
    """(mean, low, high): the mean of per-seed paired differences and its 95% t interval (nan bounds for one)."""
    values = [v for v in differences if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.mean(values)
    if len(values) == 1:
        return mean, math.nan, math.nan
    df = len(values) - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def interval_text(interval: tuple, percent: bool = False) -> str:
    mean, low, high = interval
    form = (lambda v: f"{100 * v:+.1f}%") if percent else (lambda v: f"{v:+.3f}")
    return f"{form(mean)} [{form(low)}, {form(high)}]" if not math.isnan(low) else form(mean)


def normalization_rule(block: str) -> str:
    """The influence-normalisation rule: paired per-seed differences (normalised minus plain NED) with 95%
    intervals on each kind, and the verdict, from the generated tables `block`."""
    found = sections(block)
    plain, normalized = NORMALIZATION_LOSS, f"{NORMALIZATION_LOSS}+normalized"
    lines = [f"### Influence normalisation rule: `{normalized}` against `{plain}` (the protocol's rule, applied by "
             "`normalization_rule`)", "",
             "Paired by seed; mean over seeds with its 95% t interval in brackets.", "",
             "| cell | seeds | FD change | contaminant fraction change | holds |", "|---|---|---|---|---|"]
    failures, missing, better = [], [], 0
    cells = [cell for cell in CELLS if cell.name.endswith("-normalized")]
    for cell in cells:
        rows = parse_rows(found.get(cell.name, ""))
        a, b = rows.get(plain), rows.get(normalized)
        if not (a and b and len(a["fd"]) == len(b["fd"]) == len(cell.seeds)):
            missing.append(cell.name)
            lines.append(f"| {cell.name} | not all run | | | |")
            continue
        fd = paired_interval([y / x - 1 for x, y in zip(a["fd"], b["fd"])])
        contaminant = paired_interval([y - x for x, y in zip(a["contaminant"], b["contaminant"])])
        holds = fd[2] < NORMALIZATION_FD_TOLERANCE
        if cell.contamination > 0:
            holds = holds and contaminant[2] <= NORMALIZATION_CONTAMINANT_TOLERANCE
        better += fd[0] < 0
        if not holds:
            failures.append(cell.name)
        lines.append(f"| {cell.name} | {len(cell.seeds)} | {interval_text(fd, percent=True)} | "
                     f"{interval_text(contaminant) if cell.contamination > 0 else ''} | {'yes' if holds else 'no'} |")
    if missing:
        verdict = f"undecided: {len(missing)} cell(s) not fully run yet ({', '.join(missing)})"
    elif failures or better < 2:
        why = [f"outside the tolerance on {', '.join(failures)}"] if failures else []
        why += [f"lower mean FD on {better} of {len(cells)} kinds, not at least 2"] if better < 2 else []
        verdict = f"the default stays normalize_influence=False ({'; '.join(why)})"
    else:
        verdict = "every condition holds: RobustDiffusionLoss's default becomes normalize_influence=True"
    lines += ["", f"- Verdict: {verdict}.", ""]
    return "\n".join(lines)


def seed_rows(section: str) -> dict:
    """{loss: {seed: {"fd", "contaminant", "coverage", "rare_confident"}}} of one generated table section, paired by its
    "Seeds done" line (a loss whose values do not match the seeds is left out)."""
    done = next((line for line in section.splitlines() if line.startswith("Seeds done: ")), "")
    seeds = [int(v) for v in done[len("Seeds done: "):].split(" of ")[0].split(",") if v.strip()] if done else []
    found = {}
    for loss, row in parse_rows(section).items():
        if len(row["fd"]) != len(seeds):
            continue
        coverage = row["coverage"] if len(row["coverage"]) == len(seeds) else [math.nan] * len(seeds)
        rare = row["rare_confident"] if len(row["rare_confident"]) == len(seeds) else [math.nan] * len(seeds)
        found[loss] = {seed: {"fd": fd, "contaminant": c, "coverage": cov, "rare_confident": r}
                       for seed, fd, c, cov, r in zip(seeds, row["fd"], row["contaminant"], coverage, rare)}
    return found


def _shown(interval: tuple, percent: bool = False) -> str:
    """An interval's text, marked when it excludes 0 (the effect survives)."""
    survives = not math.isnan(interval[1]) and (interval[1] > 0 or interval[2] < 0)
    return interval_text(interval, percent) + (" (survives)" if survives else "")


def demo_ablation(block: str) -> str:
    """The main job's ablation: for each step of ABLATION, the paired per-seed change in contaminant fraction, FD
    and coverage with 95% intervals, and whether it survives (its interval excludes 0), from the tables `block`."""
    found = sections(block)
    rows = {name: seed_rows(found.get(name, "")) for name in {c for _, a, b in ABLATION for c in (a[0], b[0])}}
    lines = ["### Demo ablation: what each ingredient of the main job's recipe changes (the protocol's rule, "
             "applied by `demo_ablation`)", "",
             "Paired by seed (same data, initial weights, batches and noise); mean change with its 95% t interval; "
             "an effect survives when its interval excludes 0.", "",
             "| added | seeds | contaminant fraction change | FD change | coverage change |", "|---|---|---|---|---|"]
    for what, (cell_a, loss_a), (cell_b, loss_b) in ABLATION:
        a, b = rows[cell_a].get(loss_a, {}), rows[cell_b].get(loss_b, {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            lines.append(f"| {what} | not run | | | |")
            continue
        contaminant, coverage = (paired_interval([b[s][key] - a[s][key] for s in seeds])
                                 for key in ("contaminant", "coverage"))
        fd = paired_interval([b[s]["fd"] / a[s]["fd"] - 1 for s in seeds])
        lines.append(f"| {what} (`{loss_a}` in {cell_a} -> `{loss_b}` in {cell_b}) | {', '.join(map(str, seeds))} | "
                     f"{_shown(contaminant)} | {_shown(fd, True)} | {_shown(coverage)} |")
    return "\n".join(lines + [""])


def rare_truths_rule(block: str, preset: str | None = None) -> str:
    """The rare-truths rule (docs/RESULTS.md, Protocol) for the rare-class cells of one preset (None: the quick
    protocol's first round; "demo": the second round): on each cell, how much of the standard MSE's confident share
    of the rare class each loss keeps; on the contaminated one, whether a candidate keeps today's recipe's gains
    against the MSE; and the verdict. A cell lists its losses as the MSE, today's recipe, then the candidates."""
    cells = [c for c in CELLS if c.rare_class is not None and c.preset == preset]
    losses = cells[0].losses
    recipe, candidates = losses[1], losses[2:]
    found = sections(block)
    rows = {c.name: seed_rows(found.get(c.name, "")) for c in cells}
    round_name = f", the `{preset}` preset" if preset else ""
    lines = [f"### Rare-truths rule{round_name}: does a candidate keep the rare class and the recipe's gains? (the "
             f"protocol's rule, applied by `rare_truths_rule`)", "",
             f"Confident share: samples the class judge assigns to class {RARE_CLASS} with probability above 0.9, "
             f"mean over the seeds both losses ran; kept: against the standard MSE's (target at least "
             f"{RARE_KEEP:.0%}); paired changes with 95% t intervals.", "",
             "| cell | loss | confident share | kept of the MSE's | change against today's recipe |",
             "|---|---|---|---|---|"]
    keeps = {loss: [] for loss in candidates}
    for cell in cells:
        mse = rows[cell.name].get(losses[0], {})
        base = statistics.mean(v["rare_confident"] for v in mse.values()) if mse else math.nan
        informative = base >= RARE_INFORMATIVE
        for loss in losses:
            mine = rows[cell.name].get(loss, {})
            if not mine or not mse:
                lines.append(f"| {cell.name} | {loss} | not run | | |")
                continue
            share = statistics.mean(v["rare_confident"] for v in mine.values())
            kept = share / base if informative else math.nan
            if loss in keeps and informative:
                keeps[loss].append(kept >= RARE_KEEP)
            against = rows[cell.name].get(recipe, {})
            seeds = sorted(set(mine) & set(against))
            change = _shown(paired_interval([mine[s]["rare_confident"] - against[s]["rare_confident"]
                                             for s in seeds])) if loss in candidates and len(seeds) > 1 else ""
            kept_text = f"{kept:.0%}" if informative else "the MSE's share is too small to test"
            lines.append(f"| {cell.name} | {loss} | {share:.4f} | {kept_text} | {change} |")
    mixed = next((c for c in cells if c.contamination > 0), None)
    gains = {}
    if mixed is not None:
        lines += ["", f"On `{mixed.name}`, the change against the standard MSE (paired, 95% t intervals): a candidate "
                  f"keeps the recipe's gains when its mean change lies at or below the upper end of the recipe's "
                  f"interval, in contaminant fraction and in FD.", "",
                  "| loss | contaminant fraction change | FD change | keeps the gains |", "|---|---|---|---|"]
        found_rows = rows[mixed.name]
        mse = found_rows.get(losses[0], {})

        def changes(loss):
            mine = found_rows.get(loss, {})
            seeds = sorted(set(mine) & set(mse))
            if len(seeds) < 2:
                return None
            return (paired_interval([mine[s]["contaminant"] - mse[s]["contaminant"] for s in seeds]),
                    paired_interval([mine[s]["fd"] / mse[s]["fd"] - 1 for s in seeds]))
        reference = changes(recipe)
        for loss in losses[1:]:
            mine = changes(loss)
            if mine is None or reference is None:
                lines.append(f"| {loss} | not run | | |")
                continue
            if loss in candidates:
                gains[loss] = mine[0][0] <= reference[0][2] and mine[1][0] <= reference[1][2]
            lines.append(f"| {loss} | {interval_text(mine[0])} | {interval_text(mine[1], True)} | "
                         f"{'(the reference)' if loss == recipe else 'yes' if gains[loss] else 'no'} |")
    passing = [loss for loss in candidates if keeps[loss] and all(keeps[loss]) and gains.get(loss)]
    if len(gains) < len(candidates) or any(not keeps[loss] for loss in candidates):
        verdict = "not decided: some runs are missing, or no cell could test the rare share."
    elif passing:
        best = min(passing, key=lambda loss: statistics.mean(
            v["contaminant"] for v in rows[mixed.name][loss].values()))
        verdict = (f"`{best}` meets the rare target on every informative cell and keeps the recipe's gains: it "
                   f"becomes the recommended recipe and the main job's.")
    else:
        verdict = (f"no candidate meets both targets: today's recipe (`{recipe}`) stays, and the README says "
                   f"plainly that it does not keep a rare class.")
    return "\n".join(lines + ["", f"Verdict: {verdict}", ""])


TRUST_CONTAMINANT_TOLERANCE = 0.02  # the contaminant fraction's interval may reach at most +0.02 with trust
TRUST_FD_TOLERANCE = 0.05  # and the FD change's must stay below +5%


def trust_validation_rule(block: str) -> str:
    """The rule "Trust beyond noise images" (docs/RESULTS.md, Protocol): per `trust-*` cell, the paired change with
    trust (`ned+trust` against `ned`) in contaminant fraction and FD with 95% intervals, whether trust is validated
    there, and the verdict on its setting."""
    found = sections(block)
    cells = [c for c in CELLS if c.name.startswith("trust-")]
    lines = ["### Trust beyond noise images: `ned+trust` against `ned` (the protocol's rule, applied by "
             "`trust_validation_rule`)", "",
             f"Paired by seed; validated on a contaminated kind when the contaminant fraction's interval reaches at "
             f"most +{TRUST_CONTAMINANT_TOLERANCE} and the FD change's stays below +{TRUST_FD_TOLERANCE:.0%}; on clean "
             f"data, the FD change's.", "",
             "| cell | seeds | contaminant fraction change | FD change | validated |", "|---|---|---|---|---|"]
    failed, missing = [], False
    for cell in cells:
        rows = seed_rows(found.get(cell.name, ""))
        plain, trusted = rows.get("ned", {}), rows.get("ned+trust", {})
        seeds = sorted(set(plain) & set(trusted))
        if len(seeds) < 2:
            lines.append(f"| {cell.name} | not run | | | |")
            missing = True
            continue
        contaminant = paired_interval([trusted[s]["contaminant"] - plain[s]["contaminant"] for s in seeds])
        fd = paired_interval([trusted[s]["fd"] / plain[s]["fd"] - 1 for s in seeds])
        ok = fd[2] < TRUST_FD_TOLERANCE and (cell.contamination == 0 or contaminant[2] <= TRUST_CONTAMINANT_TOLERANCE)
        if not ok:
            failed.append(cell.name)
        lines.append(f"| {cell.name} | {', '.join(map(str, seeds))} | "
                     f"{interval_text(contaminant) if cell.contamination > 0 else '(clean data)'} | "
                     f"{interval_text(fd, True)} | {'yes' if ok else 'no'} |")
    if missing:
        verdict = "not decided: some cells have not run."
    elif not failed:
        verdict = "trust is validated on every cell; its setting (the draws with t < T/2) stands."
    elif len(failed) < 2:
        verdict = (f"trust is not validated on {', '.join(failed)}: the README names it; the setting (t < T/2) "
                   f"stands (it failed on fewer than two cells).")
    else:
        verdict = (f"trust is not validated on {', '.join(failed)}: the README names them, and the next round "
                   f"compares t < T/4 and t < 3T/4 on those cells, its rule written first.")
    return "\n".join(lines + ["", f"Verdict: {verdict}", ""])


def summary_figure(block: str, path: Path) -> bool:
    """Bars of the mean over seeds (dots: each seed) of FD and contaminant fraction per loss, one panel per
    cell of FIGURE_CELLS, read from the generated tables `block`; the standard MSE shows as `mse`, the same data
    at another temperature as `<loss> tau <temperature>`."""
    found = sections(block)
    panels = []
    for name in FIGURE_CELLS:
        rows = parse_rows(found.get(name, ""))
        cell = next(c for c in CELLS if c.name == name)
        for other in CELLS:
            if other is cell or kl_cell(other) is not cell or other.seeds != cell.seeds:
                continue  # the paired cells' losses would replace the protocol's two-seed ones
            if other.scale == "1.0" and other.losses == ("kl",):
                rows.update({"mse": r for r in parse_rows(found.get(other.name, "")).values()})
            elif other.scale == "adaptive":
                tau = f" tau {other.temperature:g}" if other.temperature != 1.0 else ""
                rows.update({f"{loss}{tau}": r for loss, r in parse_rows(found.get(other.name, "")).items()})
        if rows:
            panels.append((name, rows))
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(panels))
    grid_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(2 * grid_rows, columns, figsize=(4.2 * columns, 5.2 * grid_rows), squeeze=False)
    for index, (name, rows) in enumerate(panels):
        top = 2 * (index // columns)
        for ax, key, label in ((axes[top][index % columns], "fd", "Frechet distance"),
                               (axes[top + 1][index % columns], "contaminant", "contaminant fraction")):
            losses = list(rows)
            means = [sum(rows[l][key]) / len(rows[l][key]) if rows[l][key] else float("nan") for l in losses]
            base = [l.split("+")[0].split(" ")[0] for l in losses]
            colors = ["tab:gray" if b in ("kl", "mse") else "tab:blue" if b in DIVERGENCES else "tab:orange" for b in base]
            ax.bar(range(len(losses)), means, color=colors, alpha=0.7)
            for i, loss in enumerate(losses):
                ax.plot([i] * len(rows[loss][key]), rows[loss][key], "k.", markersize=4)
            ax.set_xticks(range(len(losses)), losses, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label, fontsize=8)
            if key == "fd":
                ax.set_title(name, fontsize=9)
    for index in range(len(panels), grid_rows * columns):
        for ax in (axes[2 * (index // columns)][index % columns], axes[2 * (index // columns) + 1][index % columns]):
            ax.axis("off")
    fig.suptitle("Mean over seeds (bars) and each seed (dots); grey: KL (adaptive scale) and the standard MSE, "
                 "blue: divergences, orange: baselines; +debias / +risk_free coloured by their loss", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, wall_minutes: float | None, path: Path = RESULTS_MD,
                 figure: Path | None = None, preset: str = "quick") -> None:
    """Write the tables of `preset`'s runs in `out` between that preset's markers in `path` (a preset other
    than the protocol's quick one gets its own section at the end the first time), then the summary figure."""
    begin, end = markers(preset)
    text = path.read_text() if path.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if preset != "quick" and begin not in text and end not in text:
        text = text.rstrip("\n") + (f"\n\n## Larger budget: `--preset {preset}`\n\nThe protocol's cells at the "
                                   f"example's `{preset}` preset (`python examples/evidence.py --preset {preset}`)."
                                   f"\n\n{begin}\n{end}\n")
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {begin} / {end} that delimit the generated tables")
    head, rest = text.split(begin, 1)
    previous, tail = rest.split(end, 1)
    body = tables(out, kept=sections(previous), cells=preset_cells(preset))
    if preset == "quick":  # the rule is the quick protocol's
        body += "\n" + temperature_rule(body)
        body += "\n" + batch_scale_rule(body)
        body += "\n" + normalization_rule(body)
        body += "\n" + demo_ablation(body)
        body += "\n" + rare_truths_rule(body)
        body += "\n" + rare_truths_rule(body, "demo")
        body += "\n" + trust_validation_rule(body)
    where = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    took = f"; this invocation ran {wall_minutes:.0f} min" if wall_minutes is not None else ""
    stamp = (f"Tables written by `python examples/evidence.py` on {datetime.date.today().isoformat()} from the "
             f"runs in `{where}`{took}; a cell with no runs there keeps its table from the previous version of "
             "this file (each table says when it was tabulated).\n\n")
    path.write_text(f"{head}{begin}\n{stamp}{body}\n{end}{tail}")
    print(f"tables written to {path}")
    suffix = "" if preset == "quick" else f"_{preset}"
    figure = figure or path.parent / "figures" / f"evidence_summary{suffix}.png"
    if summary_figure(body, figure):
        print(f"summary figure written to {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="run folders (default outputs/evidence, outputs/evidence-<preset> for another preset)")
    parser.add_argument("--preset", default="quick", choices=("quick", "full"),
                        help="the example's preset: quick is the protocol (a 2-core CPU); full, its cells at the "
                             "larger budget (a GPU), tabulated in their own section")
    parser.add_argument("--only", nargs="+", default=None, help="cell names to run (default: all, in order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run only these seeds (default: each cell's own, 0 and 1 or the paired cells' 0-4)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out = (args.out or ROOT / "outputs" / ("evidence" if args.preset == "quick" else f"evidence-{args.preset}")).resolve()
    cells = preset_cells(args.preset)
    names = {cell.name for cell in cells}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        parser.error(f"unknown cell(s) {unknown} for preset {args.preset}; cells: {', '.join(c.name for c in cells)}")
    bad_seeds = sorted(set(args.seeds or ()) - set(SEEDS))
    if bad_seeds:
        parser.error(f"seeds {bad_seeds} are not in the protocol's {list(SEEDS)}")

    t0 = time.perf_counter()
    if not args.report_only:
        todo = [(cell, seed) for cell in cells if args.only is None or cell.name in args.only
                for seed in cell.seeds if (args.seeds is None or seed in args.seeds)
                and not (run_dir(args.out, cell, seed) / "results.csv").is_file()]
        todo.sort(key=lambda job: job[1])  # seed by seed, so that an interrupted grid leaves whole pairs
        print(f"{len(todo)} run(s) to do: {', '.join(f'{c.name}/seed{s}' for c, s in todo)}", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            finished = list(pool.map(lambda job: run_one(*job, args), todo))
        failed = [f"{name}/seed{seed}" for name, seed, code, _ in finished if code != 0]
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    write_report(args.out, None if args.report_only else (time.perf_counter() - t0) / 60, preset=args.preset)


if __name__ == "__main__":
    main()
