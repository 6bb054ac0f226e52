"""What the data audit writes: ``ranking.csv``, the grids of both ends, the histogram and ``report.md``, and how
well a ranking finds known bad images (``--labels``). The command itself is :mod:`.audit_command`."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .data import ImageSet
from .trainer import Trainer

__all__ = ["PROG", "RANKING_COLUMNS", "REPORT_ROWS", "class_ranks", "describe_objective", "score_ranking",
           "write_figures", "write_ranking", "write_report"]

PROG = "python -m robust_diffusion.audit"
RANKING_COLUMNS = ("rank", "index", "file", "mean_influence", "mean_penalty", "times_seen")
#: Rows of the ranking shown in report.md.
REPORT_ROWS = 20
#: A class under this share of the data that fills at least OVER_REPRESENTED times its share of the least-trusted
#: tenth is called out: rare classes are hard to learn at first, so a robust loss trusts them less (docs/AUDIT.md).
RARE_SHARE, OVER_REPRESENTED = 0.1, 2.0


def class_ranks(table, labels: Tensor, classes: Sequence[str]) -> Dict[str, object]:
    """Where each class sits in the ranking: per class its images, its share of the data, its share of the
    least-trusted tenth of the scored images and its median rank as a fraction of them (0: least trusted); and a
    warning for each rare class that fills the least-trusted tenth out of proportion."""
    scored = [row for row in table if row["times_seen"] > 0]
    tenth = max(1, len(scored) // 10)
    low = torch.bincount(labels[[row["index"] for row in scored[:tenth]]], minlength=len(classes)).double()
    order = torch.full((labels.shape[0],), math.nan, dtype=torch.float64)
    order[[row["index"] for row in scored]] = torch.arange(len(scored), dtype=torch.float64) / max(1, len(scored) - 1)
    rows, warnings = [], []
    for k, name in enumerate(classes):
        members = labels == k
        count = int(members.sum())
        if count == 0:
            continue
        share, among = count / labels.shape[0], float(low[k]) / tenth
        ranks = order[members]
        ranks = ranks[~torch.isnan(ranks)]
        rows.append({"class": name, "images": count, "share": share, "least_trusted_share": among,
                     "median_rank": float(ranks.median()) if ranks.numel() else math.nan})
        if share < RARE_SHARE and among >= OVER_REPRESENTED * share and among > 0:
            warnings.append(f"class {name!r} is {share:.1%} of the data but {among:.0%} of the least-trusted tenth: a "
                            f"rare class is hard to learn at first, so the loss trusts it less; look at its images "
                            f"before removing any, and train with +coherent (docs/AUDIT.md, rare classes)")
    return {"tenth": tenth, "rows": rows, "warnings": warnings}


def write_ranking(path: Path, table: List[Dict[str, float]], files: Sequence[str] = ()) -> None:
    """``ranking.csv`` from :meth:`InfluenceTracker.table` rows (empty cells where a value is unknown)."""
    def cell(value):
        return "" if isinstance(value, float) and math.isnan(value) else (
            f"{value:.6g}" if isinstance(value, float) else value)

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RANKING_COLUMNS)
        for row in table:
            writer.writerow([row["rank"], row["index"], files[row["index"]] if files else "",
                             cell(row["mean_influence"]), cell(row["mean_penalty"]), row["times_seen"]])


def write_figures(out: Path, images: Tensor, table, flags: Optional[Tensor], show: int) -> Dict[str, str]:
    """The grids and the histogram; what was written for each (a sentence for the report)."""
    seen = [row for row in table if row["times_seen"] > 0]
    least = seen[:show]
    most = list(reversed(seen[-show:])) if seen else []
    try:
        from matplotlib.figure import Figure
    except ImportError:
        Figure = None
    results = {}
    for name, rows, title in (("least_trusted.png", least, "least trusted (lowest mean influence weight) first"),
                              ("most_trusted.png", most, "most trusted (highest mean influence weight) first")):
        results[name] = _grid(out / name, images, rows, title, flags, Figure)
    if Figure is None:
        results["influence_hist.png"] = "not written: it needs matplotlib (pip install matplotlib)"
    elif not seen:
        results["influence_hist.png"] = "not written: no image was drawn after --score-from-step"
    else:
        figure = Figure(figsize=(6, 3.5))
        axes = figure.subplots()
        weights = torch.tensor([row["mean_influence"] for row in seen])
        if flags is None:
            axes.hist(weights.numpy(), bins=40, color="tab:blue")
        else:
            flagged = flags[torch.tensor([row["index"] for row in seen])]
            axes.hist([weights[~flagged].numpy(), weights[flagged].numpy()], bins=40, stacked=True,
                      color=["tab:blue", "tab:red"], label=["not flagged", "flagged (--labels)"])
            axes.legend()
        axes.set_xlabel("mean influence weight (low = little trusted)")
        axes.set_ylabel("images")
        axes.set_title(f"{len(seen)} images", fontsize=9)
        figure.tight_layout()
        figure.savefig(out / "influence_hist.png", dpi=100)
        results["influence_hist.png"] = "the histogram of the mean influence weights"
    return results


def _grid(path: Path, images: Tensor, rows, title: str, flags: Optional[Tensor], Figure) -> str:
    if not rows:
        return "not written: no image was drawn after --score-from-step"
    picked = images[torch.tensor([row["index"] for row in rows])].add(1).div(2).clamp(0, 1)
    columns = min(8, len(rows))
    lines = math.ceil(len(rows) / columns)
    if Figure is not None:
        figure = Figure(figsize=(1.25 * columns, 1.45 * lines + 0.4))
        axes = figure.subplots(lines, columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, row in zip(axes.flat, picked, rows):
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            mark = " *" if flags is not None and bool(flags[row["index"]]) else ""
            ax.set_title(f"#{row['rank']} [{row['index']}]{mark}\nw={row['mean_influence']:.3f}", fontsize=6)
        figure.suptitle(title + (" (* flagged in --labels)" if flags is not None else ""), fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        return f"{len(rows)} images with rank, [index] and mean influence weight w, {title}"
    # Without matplotlib: a plain grid, 2-pixel gaps, written with Pillow.
    try:
        from PIL import Image
    except ImportError:
        return "not written: it needs matplotlib (pip install matplotlib) or Pillow (pip install pillow)"
    channels, height, width = picked.shape[1:]
    canvas = torch.ones(channels, lines * (height + 2), columns * (width + 2))
    for i, image in enumerate(picked):
        top, left = (i // columns) * (height + 2), (i % columns) * (width + 2)
        canvas[:, top:top + height, left:left + width] = image
    array = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    return (f"{len(rows)} images, row by row in rank order ({title}), without captions (written without "
            f"matplotlib; pip install matplotlib for captions): their scores are the matching rows of ranking.csv")


def score_ranking(table, flags: Tensor) -> Dict[str, object]:
    """How well a ranking finds known bad images: AUROC and precision at k (k = flagged images) of ``table`` (the
    rows of :meth:`robust_diffusion.InfluenceTracker.table`, least trusted first) against ``flags`` ([N] bool,
    True = bad), and the same for the baseline that ranks by mean penalty; ``summary`` says it in one line."""
    from .metrics import auroc

    order = torch.tensor([row["index"] for row in table])
    k = int(flags.sum())
    seen = torch.tensor([row["times_seen"] > 0 for row in table])
    weight = torch.tensor([row["mean_influence"] for row in table], dtype=torch.float64)
    penalty = torch.tensor([row["mean_penalty"] for row in table], dtype=torch.float64)
    truth = flags[order]
    result: Dict[str, object] = {"flagged": k, "images": len(table), "seen": int(seen.sum())}

    def both_classes(mask):
        return bool(truth[mask].any()) and bool((~truth[mask]).any())

    result["auroc"] = auroc(-weight[seen], truth[seen]) if both_classes(seen) else math.nan
    result["precision_at_k"] = float(truth[:k].float().mean()) if k else math.nan
    known = seen & ~torch.isnan(penalty)
    if both_classes(known):
        result["baseline_auroc"] = auroc(penalty[known], truth[known])
        by_penalty = torch.argsort(torch.where(known, penalty, torch.full_like(penalty, -math.inf)), descending=True,
                                   stable=True)
        result["baseline_precision_at_k"] = float(truth[by_penalty[:k]].float().mean()) if k else math.nan
    else:
        result["baseline_auroc"] = result["baseline_precision_at_k"] = math.nan
    result["summary"] = (f"AUROC {_num(result['auroc'])}, precision at k={k} {_num(result['precision_at_k'])} "
                         f"(baseline by mean penalty: AUROC {_num(result['baseline_auroc'])}, precision at k "
                         f"{_num(result['baseline_precision_at_k'])})")
    return result


def describe_objective(args) -> str:
    if args.objective == "flow":
        return f"flow matching (velocity target, shift {args.shift:g}, {args.timestep_sampling} timesteps)"
    return "DDPM (linear betas, T = 1000, epsilon target)"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_report(args, source: str, loaded: ImageSet, table, files, loss_name: str, settings: str, trainer: Trainer,
            score_from: int, seconds: float, resumed: bool, figures: Dict[str, str], evaluation) -> str:
    images = loaded.images
    count = images.shape[0]
    times = torch.tensor([row["times_seen"] for row in table])
    never = int((times == 0).sum())
    lines = [f"# Data audit: {args.data}", "",
             f"Written by `{PROG}` on {time.strftime('%Y-%m-%d %H:%M')}. The images the robust loss trusts least come "
             f"first; see \"How to read it\" below.", "", "## Data", "",
             f"- source: {source}",
             f"- {count} images used, each {images.shape[1]} x {images.shape[2]} x {images.shape[3]} "
             f"(channels x height x width)"]
    lines += [f"- {note}" for note in loaded.notes]
    if loaded.unreadable:
        lines.append(f"- **{len(loaded.unreadable)} unreadable image file(s)**, left out of the audit (all listed at "
                     f"the end)")
    lines += ["", "## Training", "",
              f"- objective: {describe_objective(args)}",
              f"- loss: {loss_name} ({settings}); model: `{args.model}` preset "
              f"({sum(p.numel() for p in trainer.model.parameters()):,} parameters); seed {args.seed}",
              f"- budget: {trainer.step} steps of {args.batch_size} images "
              f"({trainer.step * args.batch_size / count:.1f} passes over the data), learning rate {args.lr:g}, on "
              f"{trainer.device}" + ("; resumed from a checkpoint" if resumed else ""),
              f"- time: {trainer.train_time:.0f} s of training in all ({seconds:.0f} s in this run)",
              f"- influence weights counted from step {score_from}: each image was scored {times.float().mean():.1f} "
              f"times on average (min {int(times.min())}, max {int(times.max())})"]
    if never:
        lines.append(f"- **{never} image(s) were never scored** (they come last in the ranking, with empty cells): "
                     f"raise `--steps`")
    elif float(times.float().mean()) < 5:
        lines.append("- each image was scored fewer than 5 times on average: the ranking is noisy; raise `--steps` "
                     "(`--resume` continues this run)")
    if evaluation is not None:
        lines += ["", "## Against the given labels", "",
                  f"`--labels {args.labels}`: {evaluation['flagged']} of {count} images flagged.", "",
                  "| ranking | AUROC | precision at k = number flagged |", "|---|---|---|",
                  f"| mean influence weight (this audit) | {_num(evaluation['auroc'])} | "
                  f"{_num(evaluation['precision_at_k'])} |",
                  f"| mean penalty (baseline: the mean squared denoising error) | {_num(evaluation['baseline_auroc'])} "
                  f"| {_num(evaluation['baseline_precision_at_k'])} |", "",
                  "AUROC: the probability that a flagged image ranks as less trusted than an unflagged one (0.5: "
                  "chance); over the images scored at least once. Precision at k: the fraction of flagged images "
                  "among the k least trusted."]
    if loaded.labels is not None:
        classes = class_ranks(table, loaded.labels, loaded.classes)
        lines += ["", "## Classes", "",
                  f"Where each class sits in the ranking: its share of the data against its share of the "
                  f"{classes['tenth']} least-trusted images (the least-trusted tenth), and its median rank as a "
                  f"fraction of the ranking (0: least trusted, 0.5: as the typical image).", ""]
        lines += [f"- **{warning}**" for warning in classes["warnings"]]
        lines += ["", "| class | images | share of the data | share of the least-trusted tenth | median rank |",
                  "|---|---|---|---|---|"]
        lines += [f"| {row['class']} | {row['images']} | {row['share']:.1%} | {row['least_trusted_share']:.1%} | "
                  f"{_num(row['median_rank'], 2)} |" for row in classes["rows"]]
    lines += ["", f"## The {min(REPORT_ROWS, len(table))} least-trusted images", "",
              "| rank | " + ("file" if files else "index") + " | mean influence | mean penalty | times seen |",
              "|---|---|---|---|---|"]
    for row in table[:REPORT_ROWS]:
        name = f"`{files[row['index']]}`" if files else str(row["index"])
        lines.append(f"| {row['rank']} | {name} | {_num(row['mean_influence'])} | {_num(row['mean_penalty'], 4)} | "
                     f"{row['times_seen']} |")
    lines += ["", "All of them: `ranking.csv`. Figures:", ""]
    lines += [f"- `{name}`: {what}" for name, what in figures.items()]
    lines += ["", "## How to read it", "",
              "Each time an image is drawn for a training step, at a random noise level, the robust loss gives it an "
              "*influence weight*: the factor its gradient is scaled by, relative to a typical image's. 1 means the "
              "model learns from it like from a typical image (one whose denoising error is the median at that noise "
              "level); near 0 means the loss treats it as an outlier, an image much harder to denoise than the "
              "others at that noise level; above 1, an image easier than typical. `mean_influence` averages that weight over the times the image was drawn "
              "and ranks the images: rank 1 is the least trusted. `mean_penalty` is the image's mean squared "
              "denoising error, `times_seen` how often it was scored.", "",
              "- Look at the top of the ranking (`least_trusted.png`): corrupted files, noise, images from another "
              "source, wrong crops or exposures tend to gather there. An image there is *unlike the rest as the model "
              "sees it*, not necessarily wrong: rare but valid images score low too. Inspect before you delete.",
              "- The scores are relative to this data and this run: compare ranks, not values across runs.",
              "- A short budget gives a noisy ranking. If the top changes when you train on (`--resume` with a larger "
              "`--steps`), it was not settled yet.",
              "- `influence_hist.png`: a separate group of low weights is a group of images the model treats as "
              "outliers; a single smooth hump means no image stands out."]
    if loaded.unreadable:
        lines += ["", f"## Unreadable files ({len(loaded.unreadable)})", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in loaded.unreadable]
    return "\n".join(lines) + "\n"
