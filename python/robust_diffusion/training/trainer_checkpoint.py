"""The Trainer's checkpoint: what it holds, and how a run is saved and resumed from it.

One file, ``checkpoint.safetensors`` (:mod:`~robust_diffusion.training.checkpoint`'s state-file format: tensors
in safetensors, the rest as JSON in the header, so opening it runs no code; its kind and format version in the
header). It holds the model, the EMA model, the optimizer, the grad scaler, the loss module's buffers (the adaptive
scale; an ``influence_loss``'s too), every rank's RNG states, the shared noise generator, the data position, the
step, the per-sample influence statistics, the log interval's sums and the settings a resume must agree with.
Resuming continues exactly where it left off (docs/DESIGN.md, Training kit and samplers).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..robust_loss import RobustDiffusionLoss
from .checkpoint import StateFileError, load_state, remove_stale_temporaries, rng_state, save_state, set_rng_state
from .models import checked_labels
from .runlog import read_rows, write_rows

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CHECKPOINT_KIND", "CHECKPOINT_NAME", "CHECKPOINT_VERSION", "read_checkpoint", "resume_trainer",
           "save_trainer"]

CHECKPOINT_NAME = "checkpoint.safetensors"
#: What a checkpoint file says it is, and the version of its layout: a file of another version is refused.
CHECKPOINT_KIND, CHECKPOINT_VERSION = "robust_diffusion.training checkpoint", 1
_KEYS = frozenset({"step", "epoch", "batch_in_epoch", "world_size", "batch_size", "num_samples", "config", "schedule",
                   "model", "ema", "optimizer", "scaler", "loss_fn", "rng", "noise_generator", "influence", "interval",
                   "train_time"})


#: What the entries a resume reads before loading anything must be.
_TYPES = {"step": int, "world_size": int, "batch_size": int, "num_samples": int, "config": dict, "schedule": str,
          "rng": list, "influence": dict, "interval": dict, "train_time": (int, float)}


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint's contents (tensors on the CPU), or a one-line ``ValueError`` if it is not a checkpoint of this
    version. For inspection: ``read_checkpoint("runs/ned/checkpoint.safetensors")["step"]``."""
    try:
        state = load_state(path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    except StateFileError as error:
        raise ValueError(f"cannot resume from {path}: {error.reason}; delete it or pass another --out") from None
    missing = sorted(_KEYS - set(state)) if isinstance(state, dict) else sorted(_KEYS)
    if missing:
        raise ValueError(f"cannot resume from {path}: it lacks {missing}; delete it or pass another --out")
    wrong = [key for key, kind in _TYPES.items() if not isinstance(state[key], kind) or isinstance(state[key], bool)]
    if wrong:
        raise ValueError(f"cannot resume from {path}: its {', '.join(wrong)} do not have the types a checkpoint's "
                         f"have; delete it or pass another --out")
    return state


def save_trainer(trainer: "Trainer", path: Optional[Path]) -> None:
    """Write ``trainer``'s full state to ``path`` (every rank must call it: RNG states are gathered from all)."""
    rng = rng_state(trainer.device)
    if trainer.world_size > 1:
        states: List[Any] = [None] * trainer.world_size
        dist.all_gather_object(states, rng)
    else:
        states = [rng]
    if trainer.is_main and path is not None:
        loss_fn = trainer.loss_fn
        state = {
            "step": trainer.step,
            "epoch": trainer.step // trainer.batches_per_epoch,
            "batch_in_epoch": trainer.step % trainer.batches_per_epoch,
            "world_size": trainer.world_size,
            "batch_size": trainer.config.batch_size,
            "num_samples": trainer.num_samples,
            "config": asdict(trainer.config),
            "schedule": type(trainer.schedule).__name__,
            "model": trainer.model.state_dict(),
            "ema": trainer.ema.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "loss_fn": loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else None,
            "influence_loss": trainer.influence_loss.state_dict() if trainer.influence_loss is not None else None,
            "rng": states,
            "noise_generator": trainer.noise_generator.get_state(),
            "influence": trainer.influence.state_dict(),
            "interval": trainer.interval.state_dict(),
            "train_time": trainer.train_time,
            "labels": trainer.labels.cpu() if trainer.relabelled else None,
        }
        save_state(state, path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    if trainer.world_size > 1:
        dist.barrier()


def resume_trainer(trainer: "Trainer", path: Optional[Path]) -> bool:
    """Load the checkpoint at ``path`` into ``trainer`` if it exists (see :meth:`Trainer.resume`)."""
    if trainer.is_main and path is not None:
        remove_stale_temporaries(path)
        if trainer.log_path is not None:
            remove_stale_temporaries(trainer.log_path)
    if path is None or not path.is_file():
        return False
    state = read_checkpoint(path)
    _check_same_run(trainer, state, path)
    try:  # first the states whose checks refuse a corrupted file, so that nothing else is loaded from one
        trainer.influence.load_state_dict(state["influence"])
        if isinstance(trainer.loss_fn, nn.Module) and state["loss_fn"] is not None:
            trainer.loss_fn.load_state_dict(state["loss_fn"])
        if trainer.influence_loss is not None:
            trainer.influence_loss.load_state_dict(state["influence_loss"])
        if state.get("labels") is not None:  # the labels of a relabelled run
            labels = checked_labels(state["labels"], trainer.num_samples, trainer.null_label, "its labels",
                                    allow_null=True)
    except ValueError as error:
        raise ValueError(f"cannot resume from {path}: {error}") from None
    if state.get("labels") is not None:
        trainer.labels, trainer.relabelled = labels.to(trainer.device), True
    trainer.model.load_state_dict(state["model"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.noise_generator.set_state(state["noise_generator"])
    if state["world_size"] == trainer.world_size:
        set_rng_state(state["rng"][trainer.rank], trainer.device)
    else:
        from .trainer import derive_seed
        warnings.warn(f"{path} was written by {state['world_size']} rank(s), this run has {trainer.world_size}: "
                      f"the data order and diffusion noise continue exactly, dropout streams are reseeded")
        torch.manual_seed(derive_seed(trainer.config.seed, f"rank {trainer.rank} step {state['step']}"))
    trainer.interval.load_state_dict(state["interval"])
    if isinstance(trainer.loss_fn, RobustDiffusionLoss):  # the refusals before the checkpoint were reported then
        trainer.interval.scale_skipped_seen = int(trainer.loss_fn.adaptive_scale.skipped_updates)
    trainer.step = state["step"]
    trainer.train_time = state["train_time"]
    if trainer.is_main and trainer.log_path is not None and trainer.log_path.is_file():
        rows = [row for row in read_rows(trainer.log_path) if int(row["step"]) <= trainer.step]
        write_rows(trainer.log_path, rows)
    return True


def _check_same_run(trainer: "Trainer", state: Dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another run: resuming it would silently continue another method or other data."""
    if state["schedule"] != type(trainer.schedule).__name__:
        raise ValueError(f"cannot resume from {path}: it trained with a {state['schedule']}, this run has a "
                         f"{type(trainer.schedule).__name__} (another objective, e.g. --objective ddpm / flow)")
    measured = state.get("influence_loss") is not None  # a checkpoint without the entry measured loss_fn
    if measured != (trainer.influence_loss is not None):
        raise ValueError(f"cannot resume from {path}: it was written {'with' if measured else 'without'} an "
                         f"influence_loss, this run has {'one' if trainer.influence_loss is not None else 'none'}")
    for key, default in (("risk_free", False), ("sample_trust", False), ("trust_coherence", False),
                         ("trust_low_noise", 0.5), ("conditional", False)):
        # A checkpoint without the setting was written with its default.
        if state["config"].get(key, default) != getattr(trainer.config, key):
            raise ValueError(f"cannot resume from {path}: it was written with {key}={state['config'].get(key)}, "
                             f"this run has {getattr(trainer.config, key)}")
    for key, mine in (("batch_size", trainer.config.batch_size), ("num_samples", trainer.num_samples)):
        if state[key] != mine:
            raise ValueError(f"cannot resume from {path}: it was written with {key}={state[key]}, this run has {mine}")
