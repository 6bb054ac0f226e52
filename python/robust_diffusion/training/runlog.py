"""``log.csv``, the Trainer's run log: its columns, what a row averages over its interval of steps, how a row is
written, read back and truncated on resume."""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .checkpoint import temporary_path

__all__ = ["LOG_COLUMNS", "LogInterval", "TensorBoardLog", "append_row", "read_log", "read_rows", "write_rows"]

PathLike = Union[str, os.PathLike]

#: Columns of ``log.csv``. Influence columns are empty when the interval had no sample of that kind.
#: ``steps_skipped``: optimizer steps of the interval not applied because their gradients were not finite.
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "penalty", "grad_norm", "influence_mean", "influence_clean",
               "influence_contaminated", "samples_per_s", "elapsed_s", "scale_skipped", "scale_limited",
               "steps_skipped")


class LogInterval:
    """The sums behind the next row of ``log.csv``, kept on the device (no host sync per step) and read on the host
    only when the row is written. A non-finite influence weight (NaN data, an overflowed forward pass) is not
    counted: one bad step must not turn the interval's mean into NaN.

    Args:
        device: where the sums live.
        is_contaminated: [N] bool per training sample, or None; with it the influence weights of clean and
            contaminated samples are averaged apart.
    """

    _SUMS = ("loss", "penalty", "grad_norm", "w_all", "n_all", "w_clean", "n_clean", "w_cont", "n_cont",
             "steps_skipped")

    def __init__(self, device: torch.device, is_contaminated: Optional[Tensor] = None):
        self.device = device
        self.is_contaminated = is_contaminated
        self.scale_skipped_seen = 0  # the adaptive scale's refusals already reported
        self.reset()

    def reset(self) -> None:
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self._SUMS}
        self.steps = 0
        self.samples = 0

    def add(self, loss: Tensor, grad_norm: Tensor, indices: Tensor, influence: Tensor, penalty: Tensor,
            skipped: Tensor) -> None:
        """One step: its loss, gradient norm, whether it was skipped, and its samples' influence weights and
        penalties (every rank's, gathered)."""
        sums = self.sums
        self.steps += 1
        self.samples += indices.numel()
        sums["loss"] += loss.to(torch.float64)
        sums["penalty"] += penalty.mean()
        sums["grad_norm"] += grad_norm.to(torch.float64)
        sums["steps_skipped"] += skipped
        counted = torch.isfinite(influence)
        weight = torch.where(counted, influence, torch.zeros_like(influence))
        sums["w_all"] += weight.sum()
        sums["n_all"] += counted.sum()
        if self.is_contaminated is not None:
            contaminated = self.is_contaminated[indices]
            sums["w_cont"] += (weight * contaminated).sum()
            sums["n_cont"] += (counted & contaminated).sum()
            sums["w_clean"] += (weight * ~contaminated).sum()
            sums["n_clean"] += (counted & ~contaminated).sum()

    def row(self, step: int, loss_sum: Tensor, seconds: float, scale=None, warn: bool = True) -> Dict[str, float]:
        """The interval's averages: ``loss`` (from ``loss_sum``, the loss sum averaged over ranks), ``penalty``,
        ``grad_norm``, the influence means, ``samples_per_s`` over ``seconds``, ``steps_skipped``, and the fault
        counters of ``scale`` (a RobustDiffusionLoss's ``adaptive_scale``, or None). With ``warn``, a warning says
        when optimizer steps were skipped or the scale refused batches since the last row."""
        steps = max(self.steps, 1)
        host = {name: float(value) for name, value in self.sums.items()}

        def ratio(num: str, den: str) -> float:
            return host[num] / host[den] if host[den] > 0 else math.nan

        row = {"loss": float(loss_sum) / steps, "penalty": host["penalty"] / steps,
               "grad_norm": host["grad_norm"] / steps, "influence_mean": ratio("w_all", "n_all"),
               "influence_clean": ratio("w_clean", "n_clean"), "influence_contaminated": ratio("w_cont", "n_cont"),
               "samples_per_s": self.samples / seconds if seconds > 0 else math.nan,
               "steps_skipped": int(host["steps_skipped"]), "scale_skipped": math.nan, "scale_limited": math.nan}
        if row["steps_skipped"] and warn:
            warnings.warn(f"step {step}: skipped {row['steps_skipped']} optimizer step(s) since the last log row: "
                          f"their gradients were not finite (NaN or inf: bad data, an overflow or a diverging run), "
                          f"so the weights are those from before them", RuntimeWarning)
        if scale is not None:  # read at log time only: no host sync per step
            skipped = int(scale.skipped_updates)
            if skipped > self.scale_skipped_seen and warn:
                warnings.warn(f"step {step}: the adaptive scale refused {skipped - self.scale_skipped_seen} batch "
                              f"statistic(s) since the last log row ({skipped} in all): non-finite or zero "
                              f"penalties, or optimizer steps skipped for non-finite gradients", RuntimeWarning)
            self.scale_skipped_seen = skipped
            row.update(scale_skipped=skipped, scale_limited=int(scale.limited_updates))
        return row

    def state_dict(self) -> Dict[str, object]:
        return {"steps": self.steps, "samples": self.samples, **{name: value.cpu() for name, value in self.sums.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.reset()
        self.steps, self.samples = int(state["steps"]), int(state["samples"])
        for name in self._SUMS:
            self.sums[name] = torch.as_tensor(state[name], dtype=torch.float64).to(self.device)


def read_log(path: PathLike) -> List[Dict[str, float]]:
    """The rows of a ``log.csv`` as dicts of floats (empty cells become NaN)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else math.nan) for k, v in row.items()} for row in csv.DictReader(f)]


def read_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of a ``log.csv`` as written (strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Sequence[Dict[str, str]]) -> None:
    """Replace ``path`` with ``rows`` (atomically: a run killed meanwhile keeps the old log)."""
    tmp = temporary_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cell(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def append_row(path: Path, row: Dict[str, float]) -> None:
    """Append one row (the header first, for a new file); NaN cells are written empty."""
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: _cell(row[k]) for k in LOG_COLUMNS})


class TensorBoardLog:
    """The same rows as ``log.csv``, for TensorBoard (``torch.utils.tensorboard``, which needs the ``tensorboard``
    package: ``pip install ".[tensorboard]"``), plus the adaptive scale's typical penalty per noise-level bucket and
    sample grids. Scalars: ``train/loss``, ``train/penalty``, ``train/lr``, ``train/grad_norm``,
    ``influence/mean`` (``/clean``, ``/contaminated`` where labels exist), ``faults/scale_skipped``,
    ``faults/scale_limited``, ``faults/steps_skipped``, ``perf/samples_per_s``; ``scale/bucket_<k>``; images
    ``samples`` (the EMA model's samples, values in [-1, 1] shown as [0, 1])."""

    _SCALARS = {"loss": "train/loss", "penalty": "train/penalty", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "influence_mean": "influence/mean", "influence_clean": "influence/clean",
                "influence_contaminated": "influence/contaminated", "scale_skipped": "faults/scale_skipped",
                "scale_limited": "faults/scale_limited", "steps_skipped": "faults/steps_skipped",
                "samples_per_s": "perf/samples_per_s"}

    def __init__(self, directory: PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("report_to='tensorboard' needs the tensorboard package: pip install tensorboard "
                              "(or pip install \".[tensorboard]\")") from None
        self.writer = SummaryWriter(str(directory))

    def add_row(self, row: Dict[str, float], scale=None) -> None:
        """One log row at its step (NaN cells left out), with ``scale``'s bucket values (an AdaptiveScale)."""
        step = int(row["step"])
        for column, tag in self._SCALARS.items():
            value = row.get(column)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, value, step)
        if scale is not None:
            for bucket, value in enumerate(scale.bucket_penalty.tolist()):
                self.writer.add_scalar(f"scale/bucket_{bucket}", value, step)
        self.writer.flush()

    def add_samples(self, images: Tensor, step: int) -> None:
        """A grid of samples in [-1, 1] ([B, C, H, W], C = 1 or 3)."""
        self.writer.add_images("samples", images.detach().float().cpu().add(1).div(2).clamp(0, 1), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
