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
from pathlib import Path

# The protocol and the rules live beside this script (run as `python examples/evidence.py`, or imported by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_protocol import (CELLS, DIVERGENCES, FLOW_SAMPLING, SEEDS, Cell, kl_cell,  # noqa: E402
                               preset_cells)
from evidence_rules import (batch_scale_rule, demo_ablation, normalization_rule, parse_rows,  # noqa: E402
                            rare_learning_rule, rare_truths_rule, sections, temperature_rule, trust_levels_rule,
                            trust_validation_rule)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cifar10_contaminated.py"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- evidence-tables:begin -->", "<!-- evidence-tables:end -->"


def markers(preset: str) -> tuple:
    """The comments that delimit a preset's generated tables in docs/RESULTS.md (quick: the protocol's)."""
    return (BEGIN, END) if preset == "quick" else (f"<!-- evidence-tables:{preset}:begin -->",
                                                    f"<!-- evidence-tables:{preset}:end -->")


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
    cmd += ["--trust-low-noise", str(cell.trust_low_noise)] if cell.trust_low_noise != 0.5 else []
    return cmd + (["--threads", str(threads)] if threads else [])


def run_logged(cmd: list, folder: Path, name: str) -> tuple:
    """Run `cmd` from the repository root with its output in `folder`/log.txt (no progress bars); say how it
    ended; (exit code, minutes)."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env=dict(os.environ, TQDM_DISABLE="1"))
    minutes = (time.perf_counter() - t0) / 60
    print(f"{name}: {'done' if code == 0 else f'FAILED (exit {code}, see {folder}/log.txt)'} in {minutes:.1f} min",
          flush=True)
    return code, minutes


def run_one(cell: Cell, seed: int, args) -> tuple:
    code, minutes = run_logged(command(cell, seed, args.out, args.preset, args.threads), run_dir(args.out, cell, seed),
                               f"{cell.name} seed {seed}")
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


def accuracies(rows: dict, cell: Cell) -> str:
    """" Evaluation networks' test accuracy: ..." from the cell's runs (empty for runs that predate the columns)."""
    for loss in cell.losses:
        for row in rows.get((cell.name, loss), {}).values():
            feature, judge = number(row, "classifier_accuracy"), number(row, "judge_accuracy")
            if not math.isnan(feature):
                return (f" Evaluation networks' test accuracy: feature classifier {feature:.3f}, class judge "
                        f"{judge:.3f}.")
    return ""


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
                     "class's training images (0.5: not at all); rare error: the model's denoising error on the "
                     "rare class's test images over that on the other classes' (1: learnt as well as the rest)."
                     if rare else ""), "",
                  "| loss | FD | vs KL | contaminant fraction | influence AUROC | train s | recall | coverage | "
                  "class TV | hybrid |" + (" rare share | rare confident | rare AUROC | rare error |" if rare else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if rare else "")]
        kl = rows.get((kl_cell(cell).name, "kl"), {}) or kept_kl(kept.get(kl_cell(cell).name, ""))
        data_rows = ["data: clean training images", "data: contaminated training set"] if "kl" in cell.losses else []
        for loss in list(cell.losses) + data_rows:
            by_seed = rows.get((cell.name, loss), {})
            if not by_seed:
                lines.append(f"| {loss} | not run | | | | | | | | |" + (" | | | |" if rare else ""))
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
                                      + (("rare_share", "rare_confident", "rare_auroc", "rare_error_ratio")
                                         if rare else ())) + " |")
        lines.append("")
    return "\n".join(lines)


# The cells the summary figure shows, one panel each; a panel also shows the standard-MSE cell of its data.
FIGURE_CELLS = ["noise-0.3", "gaussian-0.3", "clean", "noise-0.1", "gaussian-0.1", "noise-0.3-1500steps",
                "gaussian-0.3-1500steps", "clean-1500steps"]


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
        body += "\n" + rare_learning_rule(body)
        body += "\n" + trust_validation_rule(body)
        body += "\n" + trust_levels_rule(body)
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