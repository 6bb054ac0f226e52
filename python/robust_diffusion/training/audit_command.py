"""Data audit: which of your training images does a robust diffusion loss trust least?

    python -m robust_diffusion.audit my_images/ --out audit/            # a folder of PNG/JPEG/... files
    python -m robust_diffusion.audit images.npy --out audit/ --steps 2000
    python -m robust_diffusion.audit my_images/ --out audit/ --steps 4000 --resume   # train on, from audit/
    python -m robust_diffusion.audit my_images/ --out audit/ --objective flow        # with flow matching

It trains a small diffusion model on the images with a robust loss (NED at the adaptive scale by default) for a
budget of ``--steps`` (DDPM by default; ``--objective flow`` trains flow matching, as SD3 / Flux do, with
``--shift`` and ``--timestep-sampling``), and keeps every image's influence weight each time it is drawn
(:class:`~robust_diffusion.InfluenceTracker`): 1 when the loss learns from the image as from a typical one, near 0
when it treats it as an outlier. Averaged over the draws (at random noise levels), the weight ranks the images from
least to most trusted. It writes into ``--out``:

- ``ranking.csv``: ``rank`` (1 = least trusted), ``index`` (position in the data), ``file`` (for a folder),
  ``mean_influence``, ``mean_penalty`` (the image's mean squared denoising error) and ``times_seen``; empty cells
  for an image never drawn (raise ``--steps``).
- ``least_trusted.png`` and ``most_trusted.png``: the ``--show`` least / most trusted images with their rank and
  mean influence weight (matplotlib draws the captions; without it the grids are written plainly, row by row in
  rank order, and the scores are in ``ranking.csv``).
- ``influence_hist.png``: the histogram of the mean influence weights (needs matplotlib).
- ``report.md``: the data, what the loader did, every file it could not read, the budget, the top of the ranking
  and how to read it.
- ``checkpoint.pt``, ``log.csv`` (the Trainer's; ``--resume`` continues from them), ``audit.json`` (the settings
  and a fingerprint of the data, so a resume on other data is refused).

DATA is a folder of images (searched recursively, resized and centre-cropped to ``--image-size``, default 32;
grey or RGB), a ``.npy``/``.npz`` array (uint8 0..255 or floats in [0, 1] or [-1, 1]; ``[N, H, W]``,
``[N, H, W, C]`` or ``[N, C, H, W]``) or an IDX file: :func:`~robust_diffusion.training.data.load_images`.

``--labels FILE`` (for evaluating the audit, e.g. on data contaminated on purpose): a ``.npy`` of 0/1 flags, one per
image in ``index`` order (1 = contaminated); the report then gives the AUROC of the ranking, its precision at k (k =
the number of flagged images), and the same for the simple baseline that ranks by the mean penalty.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .arguments import add_objective_arguments, non_negative_int, positive_float, positive_int
from .experiment import (LOSS_NAMES, MODEL_PRESETS, build_loss, build_model, build_schedule, loss_settings,
                         parse_loss_name)
from .data import ContaminatedDataset, ImageSet, load_images, unreadable_summary
from .distributed import init_distributed
from .trainer import TrainConfig, Trainer

__all__ = ["build_parser", "main", "score_ranking", "write_ranking"]

PROG = "python -m robust_diffusion.audit"
RANKING_COLUMNS = ("rank", "index", "file", "mean_influence", "mean_penalty", "times_seen")
#: Rows of the ranking shown in report.md.
REPORT_ROWS = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train a small diffusion model with a robust loss on your images and rank them from "
                               "least to most trusted (the images the loss treats as outliers first).")
    parser.add_argument("data", metavar="DATA", help="a folder of images (PNG/JPEG/..., searched recursively), a "
                        ".npy/.npz array or an IDX file")
    parser.add_argument("--out", required=True, metavar="DIR", help="where ranking.csv, the grids and report.md go")
    data = parser.add_argument_group("data")
    data.add_argument("--image-size", type=positive_int, default=None,
                      help="resize and centre-crop to this (default: 32 for a folder, an array's own size)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="1 (grey) or 3 (RGB); default: 1 if every image is greyscale, else 3")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=positive_int, default=1000, help="the training budget (optimizer steps)")
    train.add_argument("--batch-size", type=positive_int, default=64)
    train.add_argument("--lr", type=positive_float, default=2e-3)
    train.add_argument("--loss", default="ned", help=f"the robust loss (default ned, at the adaptive scale); one of "
                       f"{', '.join(LOSS_NAMES)}")
    train.add_argument("--temperature", type=positive_float, default=1.0, help="the adaptive scale's tau")
    train.add_argument("--model", default="quick", choices=sorted(MODEL_PRESETS), help="UNet preset (default quick)")
    add_objective_arguments(train)
    train.add_argument("--score-from-step", type=non_negative_int, default=None,
                       help="count the influence weights from this step on (default: a fifth of --steps; the first "
                            "steps, with an untrained model, say little)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    train.add_argument("--resume", action="store_true", help="continue the audit in --out (up to --steps)")
    out = parser.add_argument_group("output")
    out.add_argument("--show", type=positive_int, default=64, help="images in each grid (default 64)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    advanced = parser.add_argument_group("evaluation (advanced)")
    advanced.add_argument("--labels", default=None, metavar="FILE",
                          help="a .npy of 0/1 contamination flags, one per image in index order: the report adds the "
                               "AUROC and precision at k of the ranking")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the audit (see the module docstring); returns the exit code. Errors are one-line usage errors (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        spec = parse_loss_name(args.loss)
        if spec.risk_free:
            raise ValueError(f"--loss {args.loss}: +risk_free needs known per-image noise levels, which your data "
                             f"does not carry")
        loaded = load_images(args.data, args.image_size, args.channels)
        images = loaded.images
        flags = _read_labels(args.labels, images.shape[0]) if args.labels else None
        fingerprint = _fingerprint(images)
        rank, world_size, device = init_distributed(args.device)
        score_from = args.score_from_step if args.score_from_step is not None else args.steps // 5
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=min(20, args.steps // 10), log_every=min(50, args.steps),
                             checkpoint_every=200, influence_from_step=score_from,
                             sample_trust=spec.trust, seed=args.seed,
                             progress=not args.no_progress)
        schedule = build_schedule(args.objective, args.shift, args.timestep_sampling)
        loss_fn = build_loss(spec, schedule, temperature=args.temperature)
        torch.manual_seed(args.seed)  # the same initial weights in every run of this seed
        model = build_model(args.model, images.shape[1])
        dataset = TensorDataset(images) if flags is None else ContaminatedDataset(
            images, flags, torch.zeros(images.shape[0]), "labels", float(flags.float().mean()))
        trainer = Trainer(model, loss_fn, dataset, schedule, config, out_dir=out, device=device)
        resumed = False
        if args.resume and trainer.checkpoint_path.is_file():
            _check_same_data(out, fingerprint)
            resumed = trainer.resume()
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        source = _describe_source(args.data)
        print(f"{source}: {images.shape[0]} images of {'x'.join(map(str, images.shape[1:]))}", flush=True)
        for note in loaded.notes:
            print(f"  {note}", flush=True)
        if loaded.unreadable:
            print(f"  {unreadable_summary(loaded.unreadable)} (all listed in {out / 'report.md'})", flush=True)
        if resumed:
            print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}", flush=True)
        else:
            if args.resume:
                print(f"no checkpoint in {out}: starting from step 0", flush=True)
            elif trainer.checkpoint_path.is_file():
                print(f"{out} holds an earlier audit: starting over (--resume continues it)", flush=True)
            if trainer.log_path.is_file():
                trainer.log_path.unlink()  # a fresh run starts a fresh log
        settings = {k: v for k, v in vars(args).items()}
        (out / "audit.json").write_text(json.dumps({"args": settings, "num_images": images.shape[0],
                                                    "fingerprint": fingerprint}, indent=2) + "\n")
        print(f"training: {_objective(args)}, loss {spec.name} ({loss_settings(loss_fn)}), model {args.model} "
              f"({sum(p.numel() for p in model.parameters()):,} parameters), {args.steps} steps of "
              f"{args.batch_size} on {device}; influence weights counted from step {score_from}", flush=True)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    if rank == 0:
        table = trainer.influence.table()  # the Trainer's tracker holds every rank's draws
        files = loaded.paths
        write_ranking(out / "ranking.csv", table, files)
        figures = _figures(out, images, table, flags, args.show)
        evaluation = score_ranking(table, flags) if flags is not None else None
        report = _report(args, source, loaded, table, files, spec.name, loss_settings(loss_fn), trainer, score_from,
                         seconds, resumed, figures, evaluation)
        (out / "report.md").write_text(report)
        seen = [row for row in table if row["times_seen"] > 0]
        print(f"wrote {out / 'ranking.csv'}, {out / 'report.md'} and the figures in {out}", flush=True)
        for name, what in figures.items():
            if what.startswith("not written") or "without matplotlib" in what:
                print(f"  {name}: {what}", flush=True)
        for row in seen[:5]:
            name = files[row["index"]] if files else f"index {row['index']}"
            print(f"  #{row['rank']}: {name} (mean influence {row['mean_influence']:.3f}, seen "
                  f"{row['times_seen']}x)", flush=True)
        if len(seen) < len(table):
            print(f"  {len(table) - len(seen)} image(s) were never drawn: raise --steps", flush=True)
        if evaluation is not None:
            print(f"against --labels: {evaluation['summary']}", flush=True)
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------- inputs
def _read_labels(path: str, count: int) -> Tensor:
    try:
        flags = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(f"--labels {path}: cannot read it as a .npy array ({type(error).__name__}: {error})") from None
    if flags.shape != (count,):
        raise ValueError(f"--labels {path}: expected {count} flags (one per image), got shape {tuple(flags.shape)}")
    if not np.isin(flags, (0, 1)).all():
        raise ValueError(f"--labels {path}: flags must be 0 or 1 (1 = contaminated)")
    return torch.from_numpy(flags.astype(bool))


def _fingerprint(images: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_same_data(out: Path, fingerprint: str) -> None:
    try:
        saved = json.loads((out / "audit.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--resume: {out / 'audit.json'} is missing or unreadable, so it is unknown which data "
                         f"{out / 'checkpoint.pt'} was trained on; pass another --out or drop --resume") from None
    if saved != fingerprint:
        raise ValueError(f"--resume: {out / 'checkpoint.pt'} was trained on other data (or another --image-size / "
                         f"--channels); pass another --out or drop --resume")


def _describe_source(data: str) -> str:
    path = Path(data)
    if path.is_dir():
        return f"folder {data}"
    kind = {".npy": ".npy array", ".npz": ".npz array"}.get(path.suffix.lower(), "IDX file")
    return f"{kind} {data}"


# ---------------------------------------------------------------------------------------------- outputs
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


def _figures(out: Path, images: Tensor, table, flags: Optional[Tensor], show: int) -> Dict[str, str]:
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


def _objective(args) -> str:
    if args.objective == "flow":
        return f"flow matching (velocity target, shift {args.shift:g}, {args.timestep_sampling} timesteps)"
    return "DDPM (linear betas, T = 1000, epsilon target)"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _report(args, source: str, loaded: ImageSet, table, files, loss_name: str, settings: str, trainer: Trainer,
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
              f"- objective: {_objective(args)}",
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
              "*influence weight*: the factor its gradient is scaled by. 1 means the model learns from it like from a "
              "typical image; near 0 means the loss treats it as an outlier, an image much harder to denoise than the "
              "others at that noise level. `mean_influence` averages that weight over the times the image was drawn "
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


if __name__ == "__main__":
    sys.exit(main())
