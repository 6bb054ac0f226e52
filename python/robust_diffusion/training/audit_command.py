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
- ``checkpoint.safetensors``, ``log.csv`` (the Trainer's; ``--resume`` continues from them), ``audit.json`` (the settings
  and a fingerprint of the data, so a resume on other data is refused).

DATA is a folder of images (searched recursively, resized and centre-cropped to ``--image-size``, default 32;
grey or RGB), a ``.npy``/``.npz`` array (uint8 0..255 or floats in [0, 1] or [-1, 1]; ``[N, H, W]``,
``[N, H, W, C]`` or ``[N, C, H, W]``) or an IDX file: :func:`~robust_diffusion.training.data.load_images`.

``--labels FILE`` (for evaluating the audit, e.g. on data contaminated on purpose): a ``.npy`` of 0/1 flags, one per
image in ``index`` order (1 = contaminated); the report then gives the AUROC of the ranking, its precision at k (k =
the number of flagged images), and the same for the simple baseline that ranks by the mean penalty.

``--pairs`` (data with class labels: a folder of class sub-folders, an ``.npz`` with ``labels``) trains a
class-conditional model instead and also ranks the (image, label) pairs, the most likely mismatched first, with the
label the model prefers (:mod:`.audit_pairs`: ``pairs.csv``, ``suspected_pairs.png``, a report section); with it,
``--labels`` flags the pairs known to be wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .arguments import (HelpFormatter, add_objective_arguments, command_name, default_threads, non_negative_int,
                        positive_float, positive_int, stop_on_interrupt)
from .experiment import (LOSS_NAMES, MODEL_PRESETS, build_influence_loss, build_loss, build_model, build_schedule,
                         loss_settings, parse_loss_name)
from .audit_pairs import evaluate_pairs, pairs_grid, pairs_report, rank_pairs, write_pairs
from .audit_report import class_ranks, describe_objective, score_ranking, write_figures, write_ranking, write_report
from .data import ContaminatedDataset, ImageSet, load_images, unreadable_summary
from .distributed import init_distributed
from .trainer import TrainConfig, Trainer

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_name("robust_diffusion.audit", "robust-diffusion-audit"), formatter_class=HelpFormatter,
        description="Train a small diffusion model with a robust loss on your images and rank them from least to "
                    "most trusted (the images the loss treats as outliers first). Ctrl-C stops it after the current "
                    "step and writes the ranking so far; --resume continues.")
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
    train.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    train.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW's learning rate")
    train.add_argument("--loss", default="ned", help=f"the robust loss (default ned, at the adaptive scale); one of "
                       f"{', '.join(LOSS_NAMES)}")
    train.add_argument("--temperature", type=positive_float, default=1.0, help="the adaptive scale's tau")
    train.add_argument("--model", default="quick", choices=sorted(MODEL_PRESETS), help="the UNet preset")
    add_objective_arguments(train)
    train.add_argument("--score-from-step", type=non_negative_int, default=None,
                       help="count the influence weights from this step on (default: a fifth of --steps; the first "
                            "steps, with an untrained model, say little)")
    train.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and the noise")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.add_argument("--threads", type=positive_int, default=default_threads(),
                       help="torch CPU threads: by default half the cores, so that other work on the machine does not "
                            "stall torch's spinning threads (they wait for each other)")
    train.add_argument("--checkpoint-every", type=positive_int, default=200,
                       help="steps between checkpoints, from which --resume continues")
    train.add_argument("--resume", action="store_true", help="continue the audit in --out (up to --steps)")
    out = parser.add_argument_group("output")
    out.add_argument("--show", type=positive_int, default=64, help="images in each grid")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    advanced = parser.add_argument_group("evaluation (advanced)")
    advanced.add_argument("--labels", default=None, metavar="FILE",
                          help="a .npy of 0/1 contamination flags, one per image in index order: the report adds the "
                               "AUROC and precision at k of the ranking (with --pairs: flags of the wrong pairs)")
    train.add_argument("--pairs", action="store_true",
                       help="data with class labels: train a class-conditional model and rank the (image, label) "
                            "pairs, the most likely mismatched first (pairs.csv, suspected_pairs.png)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the audit (see the module docstring); returns the exit code. Errors are one-line usage errors (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        audit = _prepare(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    if audit.trainer.is_main:
        _announce(args, audit)
    started = time.perf_counter()
    with stop_on_interrupt(audit.trainer) as interrupted:
        audit.trainer.train()
    if audit.trainer.is_main:
        _write_results(args, audit, time.perf_counter() - started)
        if interrupted:
            print(f"interrupted at step {audit.trainer.step} of {args.steps}: the ranking above is the one so far; "
                  f"--resume continues from {audit.trainer.checkpoint_path}", flush=True)
    if audit.trainer.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 130 if interrupted else 0


class _Audit(NamedTuple):
    """What an audit run is made of, once its arguments have been checked."""

    loaded: ImageSet
    flags: Optional[Tensor]
    fingerprint: str
    loss_name: str
    score_from: int
    trainer: Trainer
    resumed: bool


def _prepare(args) -> _Audit:
    """Read the data and the labels, build the model, loss and Trainer, and resume when asked; any bad argument
    raises a one-line ValueError."""
    spec = parse_loss_name(args.loss)
    if spec.risk_free:
        raise ValueError(f"--loss {args.loss}: +risk_free needs known per-image noise levels, which your data "
                         f"does not carry")
    loaded = load_images(args.data, args.image_size, args.channels)
    images = loaded.images
    if args.pairs and loaded.labels is None:
        raise ValueError(f"--pairs ranks (image, label) pairs, and {args.data} has no labels: use a folder of class "
                         f"sub-folders or an .npz with a labels array")
    flags = _read_labels(args.labels, images.shape[0]) if args.labels else None
    fingerprint = _fingerprint(images)
    _, _, device = init_distributed(args.device)
    score_from = args.score_from_step if args.score_from_step is not None else args.steps // 5
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=min(20, args.steps // 10), log_every=min(50, args.steps),
                         checkpoint_every=args.checkpoint_every, influence_from_step=score_from,
                         sample_trust=spec.trust, trust_coherence=spec.coherent, conditional=args.pairs,
                         seed=args.seed, progress=not args.no_progress)
    schedule = build_schedule(args.objective, args.shift, args.timestep_sampling)
    loss_fn = build_loss(spec, schedule, temperature=args.temperature)
    torch.manual_seed(args.seed)  # the same initial weights in every run of this seed
    num_classes = {"num_classes": len(loaded.classes)} if args.pairs else {}
    model = build_model(args.model, images.shape[1], **num_classes)
    if flags is None and not args.pairs:
        dataset = TensorDataset(images)
    else:  # the flags are only logged (the contaminated share of the influence), the labels condition the model
        known = flags if flags is not None else torch.zeros(images.shape[0], dtype=torch.bool)
        dataset = ContaminatedDataset(images, known, torch.zeros(images.shape[0]), "labels",
                                      float(known.float().mean()), labels=loaded.labels if args.pairs else None)
    trainer = Trainer(model, loss_fn, dataset, schedule, config, out_dir=args.out, device=device,
                      influence_loss=build_influence_loss(spec, schedule, temperature=args.temperature))
    resumed = False
    if args.resume and trainer.checkpoint_path.is_file():
        _check_same_data(trainer.checkpoint_path, fingerprint)
        resumed = trainer.resume()
    return _Audit(loaded, flags, fingerprint, spec.name, score_from, trainer, resumed)


def _announce(args, audit: _Audit) -> None:
    """What is audited and how, on the console; ``audit.json`` (the settings and the data's fingerprint); a fresh
    log unless the run resumed."""
    out, trainer, images = Path(args.out), audit.trainer, audit.loaded.images
    out.mkdir(parents=True, exist_ok=True)
    print(f"{_describe_source(args.data)}: {images.shape[0]} images of {'x'.join(map(str, images.shape[1:]))}",
          flush=True)
    for note in audit.loaded.notes:
        print(f"  {note}", flush=True)
    if audit.loaded.unreadable:
        print(f"  {unreadable_summary(audit.loaded.unreadable)} (all listed in {out / 'report.md'})", flush=True)
    if audit.resumed:
        print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}", flush=True)
    else:
        if args.resume:
            print(f"no checkpoint in {out}: starting from step 0", flush=True)
        elif trainer.checkpoint_path.is_file():
            print(f"{out} holds an earlier audit: starting over (--resume continues it)", flush=True)
        if trainer.log_path.is_file():
            trainer.log_path.unlink()  # a fresh run starts a fresh log
    (out / "audit.json").write_text(json.dumps({"args": vars(args), "num_images": images.shape[0],
                                                "fingerprint": audit.fingerprint}, indent=2) + "\n")
    print(f"training: {describe_objective(args)}, loss {audit.loss_name} ({loss_settings(trainer.loss_fn)}), model "
          f"{args.model} ({sum(p.numel() for p in trainer.model.parameters()):,} parameters), {args.steps} steps of "
          f"{args.batch_size} on {trainer.device}; influence weights counted from step {audit.score_from}", flush=True)


def _write_results(args, audit: _Audit, seconds: float) -> None:
    """The ranking, the figures and the report, and a summary of them on the console."""
    out, loaded, flags = Path(args.out), audit.loaded, audit.flags
    table = audit.trainer.influence.table()  # the Trainer's tracker holds every rank's draws
    files = loaded.paths
    write_ranking(out / "ranking.csv", table, files)
    figures = write_figures(out, loaded.images, table, flags, args.show)
    evaluation = score_ranking(table, flags) if flags is not None else None
    report = write_report(args, _describe_source(args.data), loaded, table, files, audit.loss_name,
                          loss_settings(audit.trainer.loss_fn), audit.trainer, audit.score_from, seconds,
                          audit.resumed, figures, evaluation)
    (out / "report.md").write_text(report)
    seen = [row for row in table if row["times_seen"] > 0]
    print(f"wrote {out / 'ranking.csv'}, {out / 'report.md'} and the figures in {out}", flush=True)
    for name, what in figures.items():
        if what.startswith("not written") or "without matplotlib" in what:
            print(f"  {name}: {what}", flush=True)
    for row in seen[:5]:
        name = files[row["index"]] if files else f"index {row['index']}"
        print(f"  #{row['rank']}: {name} (mean influence {row['mean_influence']:.3f}, seen {row['times_seen']}x)",
              flush=True)
    if len(seen) < len(table):
        print(f"  {len(table) - len(seen)} image(s) were never drawn: raise --steps", flush=True)
    if evaluation is not None:
        print(f"against --labels: {evaluation['summary']}", flush=True)
    if loaded.labels is not None:
        for warning in class_ranks(table, loaded.labels, loaded.classes)["warnings"]:
            print(f"note: {warning}", flush=True)
    if args.pairs:
        _write_pairs(args, audit, report)


def _write_pairs(args, audit: _Audit, report: str) -> None:
    """The pairs mode's ranking, grid and report section (appended to report.md), and a summary on the console."""
    out, loaded, trainer = Path(args.out), audit.loaded, audit.trainer
    rows = rank_pairs(trainer.ema, trainer.schedule, loaded.images, loaded.labels, device=trainer.device)
    write_pairs(out / "pairs.csv", rows, loaded.paths, loaded.classes)
    figure = pairs_grid(out / "suspected_pairs.png", loaded.images, rows, loaded.classes, args.show)
    evaluation = evaluate_pairs(rows, audit.flags, loaded.images, loaded.labels, len(loaded.classes),
                                seed=args.seed) if audit.flags is not None else None
    flagged = int(audit.flags.sum()) if audit.flags is not None else 0
    lines = pairs_report(rows, loaded.paths, loaded.classes, figure, evaluation, flagged)
    (out / "report.md").write_text(report + "\n".join(lines) + "\n")
    disagree = sum(row["label"] != row["preferred"] for row in rows)
    print(f"pairs: the model prefers another label for {disagree} of {len(rows)} images; wrote {out / 'pairs.csv'} "
          f"and {out / 'suspected_pairs.png'}", flush=True)
    if evaluation is not None:
        print("pairs against --labels: " + ", ".join(f"{name} AUROC {values['auroc']:.3f}"
                                                     for name, values in evaluation.items()), flush=True)


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


def _check_same_data(checkpoint: Path, fingerprint: str) -> None:
    settings = checkpoint.parent / "audit.json"
    try:
        saved = json.loads(settings.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--resume: {settings} is missing or unreadable, so it is unknown which data "
                         f"{checkpoint} was trained on; pass another --out or drop --resume") from None
    if saved != fingerprint:
        raise ValueError(f"--resume: {checkpoint} was trained on other data (or another --image-size / "
                         f"--channels); pass another --out or drop --resume")


def _describe_source(data: str) -> str:
    path = Path(data)
    if path.is_dir():
        return f"folder {data}"
    kind = {".npy": ".npy array", ".npz": ".npz array"}.get(path.suffix.lower(), "IDX file")
    return f"{kind} {data}"


if __name__ == "__main__":
    sys.exit(main())
