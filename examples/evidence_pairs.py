"""The mismatched-pair evidence of docs/RESULTS.md: which signal of a class-conditional model finds flipped labels.

Runs `examples/label_noise.py --preset pairs` for every condition of the protocol's "Mismatched-pair rule"
(Fashion-MNIST, symmetric 20% and 40%, asymmetric 30% label noise) and seed 0-4, each in its own folder
(`outputs/evidence-pairs/<condition>/seed<k>`; a finished run is reused), then writes the table and the rule's
verdict between the pairs markers of docs/RESULTS.md. Most of a run is scoring the pairs (2,400 images x 11 labels
x 5 noise levels: 132,000 UNet forward passes, more than the 1000 training steps):
`python examples/evidence_pairs.py --jobs 2 --threads 1` on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The evidence grid's runner lives beside this script (run as `python examples/evidence_pairs.py`, or imported).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import run_logged  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "label_noise.py"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- evidence-pairs:begin -->", "<!-- evidence-pairs:end -->"

#: condition name -> (rate, kind), as the rule fixes them
CONDITIONS = {"symmetric-0.2": (0.2, "symmetric"), "symmetric-0.4": (0.4, "symmetric"),
              "asymmetric-0.3": (0.3, "asymmetric")}
SEEDS = (0, 1, 2, 3, 4)
#: the candidates, in the order the table shows them; confident learning is the baseline, not a candidate
CANDIDATES = ("margin", "contrast", "mistrust", "influence", "trust")
BASELINE = "confident learning"
TARGET_AUROC = 0.9


def run_dir(out: Path, condition: str, seed: int) -> Path:
    return out / condition / f"seed{seed}"


def command(condition: str, seed: int, out: Path, threads: int | None) -> list:
    rate, kind = CONDITIONS[condition]
    cmd = [sys.executable, str(EXAMPLE), "--preset", "pairs", "--runs", "noisy", "--label-noise", str(rate),
           "--label-noise-kind", kind, "--seed", str(seed), "--out", str(run_dir(out, condition, seed)),
           "--eval-cache", str(ROOT / "outputs" / "evidence" / "eval_cache")]
    return cmd + (["--threads", str(threads)] if threads else [])


def run_one(condition: str, seed: int, args) -> int:
    return run_logged(command(condition, seed, args.out, args.threads), run_dir(args.out, condition, seed),
                      f"{condition} seed {seed}")[0]


def read_signals(out: Path) -> dict:
    """{condition: {seed: {signal: row}}} of every finished run."""
    found = {}
    for condition in CONDITIONS:
        for seed in SEEDS:
            path = run_dir(out, condition, seed) / "pair_signals.csv"
            if path.is_file():
                with open(path) as f:
                    found.setdefault(condition, {})[seed] = {row["signal"]: row for row in csv.DictReader(f)}
    return found


def _mean(values: list) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


def _values(runs: dict, signal: str, key: str) -> list:
    return [float(rows[signal][key]) for rows in runs.values() if signal in rows]


def tables(found: dict) -> str:
    """Per condition: each signal's AUROC and precision at k, mean over seeds with the seeds' values."""
    lines = []
    for condition, runs in found.items():
        seeds = sorted(runs)
        flipped = [int(next(iter(runs[seed].values()))["flipped"]) for seed in seeds]
        restored = [float(next(iter(runs[seed].values()))["restored"]) for seed in seeds]
        lines += [f"### {condition}: seeds {', '.join(map(str, seeds))} ({', '.join(map(str, flipped))} of 2,400 "
                  f"labels flipped; the preferred label restores {_mean(restored):.1%} of them)", "",
                  "| signal | AUROC, mean (seeds) | precision at k, mean (seeds) |", "|---|---|---|"]
        for signal in CANDIDATES + (BASELINE,):
            cells = []
            for key in ("auroc", "precision_at_k"):
                values = _values(runs, signal, key)
                cells.append(f"{_mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})" if values else "")
            lines.append(f"| {signal}{' (baseline)' if signal == BASELINE else ''} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines)


def mismatched_pair_rule(found: dict) -> str:
    """The rule's verdict: the candidate with the highest mean AUROC over every condition and seed wins (only when
    all conditions have all seeds); per condition, the target: its mean AUROC at least 0.9 and its mean precision
    at k at least confident learning's."""
    lines = ["### Mismatched-pair rule: which signal finds the flipped pairs? (the protocol's rule, applied by "
             "`mismatched_pair_rule`)", ""]
    complete = all(sorted(found.get(condition, {})) == list(SEEDS) for condition in CONDITIONS)
    if not complete:
        have = {condition: sorted(found.get(condition, {})) for condition in CONDITIONS}
        return "\n".join(lines + [f"Not decided: the rule needs seeds {list(SEEDS)} on every condition; on disk: "
                                  f"{have}.", ""])
    overall = {signal: _mean([v for condition in CONDITIONS for v in _values(found[condition], signal, "auroc")])
               for signal in CANDIDATES}
    winner = max(CANDIDATES, key=lambda signal: overall[signal])
    lines += ["Mean AUROC over the three conditions and five seeds: "
              + ", ".join(f"{signal} {overall[signal]:.3f}" for signal in CANDIDATES)
              + f". **Winner: {winner}**, what `--pairs` ranks by.", "",
              "| condition | winner's AUROC | winner's precision at k | confident learning's precision at k | "
              "target holds |", "|---|---|---|---|---|"]
    for condition in CONDITIONS:
        auroc = _mean(_values(found[condition], winner, "auroc"))
        precision = _mean(_values(found[condition], winner, "precision_at_k"))
        baseline = _mean(_values(found[condition], BASELINE, "precision_at_k"))
        holds = auroc >= TARGET_AUROC and precision >= baseline
        lines.append(f"| {condition} | {auroc:.3f} | {precision:.3f} | {baseline:.3f} | {'yes' if holds else 'no'} |")
    return "\n".join(lines + [""])


def write_report(out: Path, path: Path = RESULTS_MD) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} lacks the markers {BEGIN} / {END} that delimit the mismatched-pair tables")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    found = read_signals(out)
    where = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    stamp = (f"Written by `python examples/evidence_pairs.py` on {datetime.date.today().isoformat()} from the runs "
             f"in `{where}`.\n\n")
    body = tables(found) + "\n" + mismatched_pair_rule(found) if found else "No run on disk yet.\n"
    path.write_text(f"{head}{BEGIN}\n{stamp}{body}\n{END}{tail}")
    print(f"mismatched-pair tables written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "evidence-pairs")
    parser.add_argument("--only", nargs="+", choices=tuple(CONDITIONS), default=None,
                        help="conditions to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, default=None,
                        help="run only these seeds (default: 0-4)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    args.out = args.out.resolve()
    if not args.report_only:
        todo = [(condition, seed) for seed in (args.seeds or SEEDS) for condition in (args.only or CONDITIONS)
                if not (run_dir(args.out, condition, seed) / "pair_signals.csv").is_file()]
        print(f"{len(todo)} run(s) to do: {', '.join(f'{c}/seed{s}' for c, s in todo)}", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda job: run_one(*job, args), todo))
        if any(codes):
            print("some runs failed; see their log.txt", file=sys.stderr)
    write_report(args.out)


if __name__ == "__main__":
    main()
