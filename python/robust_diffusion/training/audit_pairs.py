"""The audit's pairs mode (``--pairs``): which (image, label) pairs does a class-conditional model find mismatched?

After the audit has trained a class-conditional model on the data's labels, :func:`rank_pairs` scores every pair
with :mod:`.pairs` (each image's denoising error under every label, the same noise for all) and ranks them by the
margin: how much worse the given label denoises the image than the label the model prefers (0 when they agree).
It writes ``pairs.csv`` (every pair, most suspect first, with the preferred label and all three scores),
``suspected_pairs.png`` (the most suspect images, each titled "given -> preferred") and a section of report.md.
With ``--labels`` (0/1 flags of the pairs known to be wrong), each score's AUROC and precision at k are reported
beside the confident-learning baseline's. Which score ranks is provisional until the evidence decides it
(docs/RESULTS.md); all three are in ``pairs.csv``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .pairs import confident_learning_scores, detection_quality, label_errors, pair_scores

__all__ = ["PAIR_COLUMNS", "PAIR_SCORES", "evaluate_pairs", "pairs_report", "rank_pairs", "write_pairs"]

PAIR_COLUMNS = ("rank", "index", "file", "label", "preferred", "margin", "contrast", "mistrust")
#: The scores of a pair, each higher for a pair more likely mismatched; the first ranks.
PAIR_SCORES = ("margin", "contrast", "mistrust")


def rank_pairs(model, schedule, images: Tensor, labels: Tensor, *, device=None) -> List[Dict[str, object]]:
    """Every pair's row (see the module docstring), most suspect first: descending margin, then descending
    mistrust, then index."""
    scores = pair_scores(label_errors(model, schedule, images, device=device), labels)
    values = {name: getattr(scores, name).tolist() for name in PAIR_SCORES}
    order = sorted(range(images.shape[0]), key=lambda i: (-values["margin"][i], -values["mistrust"][i], i))
    return [{"rank": rank + 1, "index": i, "label": int(labels[i]), "preferred": int(scores.preferred[i]),
             **{name: values[name][i] for name in PAIR_SCORES}} for rank, i in enumerate(order)]


def write_pairs(path: Path, rows, files: Sequence[str], classes: Sequence[str]) -> None:
    """``pairs.csv``: one row per pair, labels by their class names."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PAIR_COLUMNS)
        for row in rows:
            writer.writerow([row["rank"], row["index"], files[row["index"]] if files else "",
                             classes[row["label"]], classes[row["preferred"]],
                             *(f"{row[name]:.6g}" for name in PAIR_SCORES)])


def evaluate_pairs(rows, flags: Tensor, images: Tensor, labels: Tensor, num_classes: int, *,
                   seed: int = 0) -> Dict[str, Dict[str, float]]:
    """AUROC and precision at k (k = the number flagged) of each score against ``flags``, and of the
    confident-learning baseline (a classifier trained out of fold on the same labels)."""
    by_index = sorted(rows, key=lambda row: row["index"])
    found = {name: torch.tensor([row[name] for row in by_index]) for name in PAIR_SCORES}
    found["confident learning (baseline)"] = confident_learning_scores(images, labels, num_classes=num_classes,
                                                                       seed=seed)
    return detection_quality(found, flags)


def pairs_grid(path: Path, images: Tensor, rows, classes: Sequence[str], show: int) -> str:
    """The ``show`` most suspect pairs, each titled "given -> preferred"; what was written (for the report)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "not written: it needs matplotlib (pip install matplotlib)"
    rows = rows[:show]
    columns = min(8, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure = Figure(figsize=(1.4 * columns, 1.6 * lines + 0.4))
    axes = figure.subplots(lines, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        image = images[row["index"]].add(1).div(2).clamp(0, 1)
        ax.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(),
                  cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)
        agree = row["label"] == row["preferred"]
        ax.set_title(f"#{row['rank']} {classes[row['label']]}" + ("" if agree else f"\n-> {classes[row['preferred']]}"),
                     fontsize=7, color="black" if agree else "tab:red")
    figure.suptitle("most suspect pairs first: given label -> the label the model prefers", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"the {len(rows)} most suspect pairs, each with its label and the label the model prefers"


def pairs_report(rows, files: Sequence[str], classes: Sequence[str], figure: str,
                 evaluation: Optional[Dict[str, Dict[str, float]]], flagged: int, shown: int = 20) -> List[str]:
    """The report's pairs section."""
    disagree = sum(row["label"] != row["preferred"] for row in rows)
    lines = ["", "## Mismatched pairs (`--pairs`)", "",
             f"A class-conditional model was trained on the given labels; each image's denoising error under every "
             f"label (the same noise for all) gives the label the model prefers. In {disagree} of {len(rows)} pairs "
             f"it is not the given one. Ranked by the margin: how much worse the given label denoises the image than "
             f"the preferred one. All pairs: `pairs.csv`; `suspected_pairs.png`: {figure}.", "",
             "| rank | " + ("file" if files else "index") + " | label | preferred | margin |", "|---|---|---|---|---|"]
    for row in rows[:shown]:
        name = f"`{files[row['index']]}`" if files else str(row["index"])
        lines.append(f"| {row['rank']} | {name} | {classes[row['label']]} | {classes[row['preferred']]} | "
                     f"{row['margin']:.4g} |")
    if evaluation is not None:
        lines += ["", f"Against `--labels` ({flagged} pairs flagged as wrong):", "",
                  "| score | AUROC | precision at k = number flagged |", "|---|---|---|"]
        lines += [f"| {name} | {values['auroc']:.3f} | {values['precision_at_k']:.3f} |"
                  for name, values in evaluation.items()]
    return lines
