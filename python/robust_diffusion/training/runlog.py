"""``log.csv``, the DDPM trainer's run log: its columns, how a row is written, read back and truncated on resume."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

from .checkpoint import temporary_path

__all__ = ["LOG_COLUMNS", "append_row", "read_log", "read_rows", "write_rows"]

PathLike = Union[str, os.PathLike]

#: Columns of ``log.csv``. Influence columns are empty when the interval had no sample of that kind.
#: ``steps_skipped``: optimizer steps of the interval not applied because their gradients were not finite.
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "penalty", "grad_norm", "influence_mean", "influence_clean",
               "influence_contaminated", "samples_per_s", "elapsed_s", "scale_skipped", "scale_limited",
               "steps_skipped")

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
