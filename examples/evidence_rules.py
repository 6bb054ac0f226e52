"""The deciding rules of docs/RESULTS.md's Protocol, applied to the evidence grid's generated tables: each rule
reads the per-seed values of its cells back from the tables (so a verdict is exactly what the tables show) and
writes its table and verdict. `examples/evidence.py` appends them to the tables it writes."""

from __future__ import annotations

import math
import statistics

from evidence_protocol import (ABLATION, BATCH_RULE_AUROC_TOLERANCE, BATCH_RULE_FD_TOLERANCE, BATCH_RULE_LOSSES,
                               CELLS, NORMALIZATION_CONTAMINANT_TOLERANCE, NORMALIZATION_FD_TOLERANCE,
                               NORMALIZATION_LOSS, RARE_CLASS, RARE_ERROR_TOLERANCE, RARE_INFORMATIVE,
                               RARE_KEEP, TRUST_CONTAMINANT_TOLERANCE, TRUST_FD_TOLERANCE, TRUST_KINDS,
                               TRUST_LEVELS)

def sections(block: str) -> dict:
    """{cell name: its section's text} of a generated tables block."""
    parts = ("\n" + block).split("\n### ")[1:]
    return {part.split(":", 1)[0]: "### " + part.rstrip("\n") + "\n" for part in parts}



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
                          "rare_confident": values(parts[11]) if len(parts) > 12 else [],
                          "rare_error": values(parts[13]) if len(parts) > 13 else []}
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
    """{loss: {seed: {"fd", "contaminant", "coverage", "rare_confident", "rare_error"}}} of one generated table
    section, paired by its "Seeds done" line (a loss whose values do not match the seeds is left out)."""
    done = next((line for line in section.splitlines() if line.startswith("Seeds done: ")), "")
    seeds = [int(v) for v in done[len("Seeds done: "):].split(" of ")[0].split(",") if v.strip()] if done else []
    found = {}
    for loss, row in parse_rows(section).items():
        if len(row["fd"]) != len(seeds):
            continue
        coverage = row["coverage"] if len(row["coverage"]) == len(seeds) else [math.nan] * len(seeds)
        rare = row["rare_confident"] if len(row["rare_confident"]) == len(seeds) else [math.nan] * len(seeds)
        error = row["rare_error"] if len(row["rare_error"]) == len(seeds) else [math.nan] * len(seeds)
        found[loss] = {seed: {"fd": fd, "contaminant": c, "coverage": cov, "rare_confident": r, "rare_error": e}
                       for seed, fd, c, cov, r, e in zip(seeds, row["fd"], row["contaminant"], coverage, rare, error)}
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
        gain_lines, gains = _recipe_gains(rows[mixed.name], mixed.name, losses)
        lines += gain_lines
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


def _recipe_gains(found_rows: dict, cell: str, losses: tuple) -> tuple:
    """On a contaminated rare-class cell (losses: the MSE, today's recipe, the candidates), each loss's paired change
    against the MSE in contaminant fraction and FD, and whether each candidate keeps the recipe's gains (its mean
    changes at or below the upper ends of the recipe's intervals): (table lines, {candidate: kept})."""
    recipe, candidates = losses[1], losses[2:]
    lines = ["", f"On `{cell}`, the change against the standard MSE (paired, 95% t intervals): a candidate "
             f"keeps the recipe's gains when its mean change lies at or below the upper end of the recipe's "
             f"interval, in contaminant fraction and in FD.", "",
             "| loss | contaminant fraction change | FD change | keeps the gains |", "|---|---|---|---|"]
    mse = found_rows.get(losses[0], {})

    def changes(loss):
        mine = found_rows.get(loss, {})
        seeds = sorted(set(mine) & set(mse))
        if len(seeds) < 2:
            return None
        return (paired_interval([mine[s]["contaminant"] - mse[s]["contaminant"] for s in seeds]),
                paired_interval([mine[s]["fd"] / mse[s]["fd"] - 1 for s in seeds]))
    reference = changes(recipe)
    gains = {}
    for loss in losses[1:]:
        mine = changes(loss)
        if mine is None or reference is None:
            lines.append(f"| {loss} | not run | | |")
            continue
        if loss in candidates:
            gains[loss] = mine[0][0] <= reference[0][2] and mine[1][0] <= reference[1][2]
        lines.append(f"| {loss} | {interval_text(mine[0])} | {interval_text(mine[1], True)} | "
                     f"{'(the reference)' if loss == recipe else 'yes' if gains[loss] else 'no'} |")
    return lines, gains


def rare_learning_rule(block: str) -> str:
    """The rare-truths rule's third round (docs/RESULTS.md, Protocol): on the demo preset's rare-class cells, each
    loss's paired change against the standard MSE in the rare-class error ratio (the model's denoising error on the
    rare class's test images over the other classes'), whether it learns the class as the MSE does (the upper end
    of the 95% interval at most RARE_ERROR_TOLERANCE), the recipe's gains as in the second round, and the verdict."""
    cells = [c for c in CELLS if c.rare_class is not None and c.preset == "demo"]
    losses = cells[0].losses
    mse_name, recipe, candidates = losses[0], losses[1], losses[2:]
    found = sections(block)
    rows = {c.name: seed_rows(found.get(c.name, "")) for c in cells}
    lines = ["### Rare-truths rule, third round: does a loss learn the rare class as the standard MSE does? (the "
             "protocol's rule, applied by `rare_learning_rule`)", "",
             f"Rare error: the model's denoising error on class {RARE_CLASS}'s test images over its error on the "
             f"other classes' (the same noise for every loss); a loss learns the class as the MSE does when the upper "
             f"end of the 95% t interval of its paired change is at most +{RARE_ERROR_TOLERANCE}.", "",
             "| cell | loss | rare error, mean | change against the MSE | learns it as the MSE does |",
             "|---|---|---|---|---|"]
    learns = {loss: [] for loss in losses[1:]}
    missing = False
    for cell in cells:
        mse = {s: v for s, v in rows[cell.name].get(mse_name, {}).items() if not math.isnan(v["rare_error"])}
        for loss in losses:
            mine = {s: v for s, v in rows[cell.name].get(loss, {}).items() if not math.isnan(v["rare_error"])}
            seeds = sorted(set(mine) & set(mse))
            if len(seeds) < 2:
                lines.append(f"| {cell.name} | {loss} | not measured | | |")
                missing = True
                continue
            mean = statistics.mean(mine[s]["rare_error"] for s in seeds)
            if loss == mse_name:
                lines.append(f"| {cell.name} | {loss} | {mean:.3f} | (the reference) | |")
                continue
            change = paired_interval([mine[s]["rare_error"] - mse[s]["rare_error"] for s in seeds])
            ok = change[2] <= RARE_ERROR_TOLERANCE
            learns[loss].append(ok)
            lines.append(f"| {cell.name} | {loss} | {mean:.3f} | {_shown(change)} | {'yes' if ok else 'no'} |")
    mixed = next(c for c in cells if c.contamination > 0)
    gain_lines, gains = _recipe_gains(rows[mixed.name], mixed.name, losses)
    lines += gain_lines
    if missing or len(gains) < len(candidates):
        verdict = "not decided: some runs are missing or were not measured."
    else:
        passing = [loss for loss in candidates if all(learns[loss]) and gains[loss]]
        if passing:
            best = min(passing, key=lambda loss: statistics.mean(
                v["contaminant"] for v in rows[mixed.name][loss].values()))
            verdict = (f"`{best}` learns the rare class as the MSE does on both cells and keeps the recipe's gains: "
                       f"it becomes the recommended recipe and the main job's.")
        elif all(learns[recipe]):
            verdict = (f"today's recipe (`{recipe}`) learns the rare class as the MSE does on both cells: it stays, "
                       f"and the README says so, with these numbers.")
        else:
            verdict = (f"neither today's recipe nor a candidate that keeps its gains learns the rare class as the MSE "
                       f"does: `{recipe}` stays, and the README says plainly that it learns a rare class less well.")
    return "\n".join(lines + ["", f"Verdict: {verdict}", ""])


def _trust_change(plain: dict, trusted: dict, contamination: float):
    """(seeds, contaminant fraction interval, FD change interval, validated) of trust against no trust, paired by
    seed; None with fewer than two seeds in common."""
    seeds = sorted(set(plain) & set(trusted))
    if len(seeds) < 2:
        return None
    contaminant = paired_interval([trusted[s]["contaminant"] - plain[s]["contaminant"] for s in seeds])
    fd = paired_interval([trusted[s]["fd"] / plain[s]["fd"] - 1 for s in seeds])
    ok = fd[2] < TRUST_FD_TOLERANCE and (contamination == 0 or contaminant[2] <= TRUST_CONTAMINANT_TOLERANCE)
    return seeds, contaminant, fd, ok


def trust_validation_rule(block: str) -> str:
    """The rule "Trust beyond noise images" (docs/RESULTS.md, Protocol): per `trust-*` cell, the paired change with
    trust (`ned+trust` against `ned`) in contaminant fraction and FD with 95% intervals, whether trust is validated
    there, and the verdict on its setting."""
    found = sections(block)
    cells = [c for c in CELLS if c.name in {f"trust-{kind[0]}" for kind in TRUST_KINDS[1:]}]  # the first round's
    lines = ["### Trust beyond noise images: `ned+trust` against `ned` (the protocol's rule, applied by "
             "`trust_validation_rule`)", "",
             f"Paired by seed; validated on a contaminated kind when the contaminant fraction's interval reaches at "
             f"most +{TRUST_CONTAMINANT_TOLERANCE} and the FD change's stays below +{TRUST_FD_TOLERANCE:.0%}; on clean "
             f"data, the FD change's.", "",
             "| cell | seeds | contaminant fraction change | FD change | validated |", "|---|---|---|---|---|"]
    failed, missing = [], False
    for cell in cells:
        rows = seed_rows(found.get(cell.name, ""))
        checked = _trust_change(rows.get("ned", {}), rows.get("ned+trust", {}), cell.contamination)
        if checked is None:
            lines.append(f"| {cell.name} | not run | | | |")
            missing = True
            continue
        seeds, contaminant, fd, ok = checked
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


def trust_levels_rule(block: str) -> str:
    """Trust's second round (docs/RESULTS.md, Protocol, "Trust's noise levels, second round"): per kind and
    setting of TRUST_LEVELS, `ned+trust` against the kind's `ned` (paired by seed), whether trust is validated, and
    which setting is the default."""
    found = sections(block)
    lines = ["### Trust's noise levels: `ned+trust` measured on t < T/4, T/2 or 3T/4, against `ned` (the protocol's "
             "rule, applied by `trust_levels_rule`)", "",
             "Paired by seed against the kind's `ned`; validated as in the first round.", "",
             "| kind | trust measured on | seeds | contaminant fraction change | FD change | validated |",
             "|---|---|---|---|---|---|"]
    validated = {level: set() for level in TRUST_LEVELS}
    missing = False
    for kind, contamination, _, _ in TRUST_KINDS:
        plain = seed_rows(found.get(f"trust-{kind}", "")).get("ned", {})
        for level in TRUST_LEVELS:
            cell = f"trust-{kind}" if level == TRUST_LEVELS[0] else f"trust-{kind}-low{level}"
            checked = _trust_change(plain, seed_rows(found.get(cell, "")).get("ned+trust", {}), contamination)
            if checked is None:
                lines.append(f"| {kind} | t < {level} T | not run | | | |")
                missing = True
                continue
            seeds, contaminant, fd, ok = checked
            if ok:
                validated[level].add(kind)
            lines.append(f"| {kind} | t < {level} T | {', '.join(map(str, seeds))} | "
                         f"{interval_text(contaminant) if contamination > 0 else '(clean data)'} | "
                         f"{interval_text(fd, True)} | {'yes' if ok else 'no'} |")
    default = TRUST_LEVELS[0]
    if missing:
        verdict = "not decided: some cells have not run."
    else:
        better = [level for level in TRUST_LEVELS[1:]
                  if validated[default] <= validated[level] and len(validated[level]) > len(validated[default])]
        names = {level: ", ".join(sorted(validated[level])) or "none" for level in TRUST_LEVELS}
        said = "; ".join(f"t < {level} T on {names[level]}" for level in TRUST_LEVELS)
        if better:
            noise = seed_rows(found.get(f"trust-{TRUST_KINDS[0][0]}", "")).get("ned", {})

            def noise_change(level):
                trusted = seed_rows(found.get(f"trust-{TRUST_KINDS[0][0]}-low{level}", "")).get("ned+trust", {})
                return _trust_change(noise, trusted, 0.3)[1][0]
            chosen = min(better, key=lambda level: (-len(validated[level]), noise_change(level)))
            verdict = (f"validated: {said}. t < {chosen} T is validated wherever t < {default} T is and on more "
                       f"kinds: it becomes the default (TrainConfig.trust_low_noise = {chosen}).")
        else:
            verdict = (f"validated: {said}. No setting is validated wherever t < {default} T is and on more kinds: "
                       f"the default stays {default}; the README names the kinds where it is not validated and the "
                       f"setting validated there, if any.")
    return "\n".join(lines + ["", f"Verdict: {verdict}", ""])
