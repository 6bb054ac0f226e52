"""Crash-safe files and RNG state for the DDPM kit: a torch.save that never leaves a torn file, the clean-up of
temporaries that a killed writer left, and the RNG states a checkpoint must carry for an exact resume."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
import torch

__all__ = ["atomic_save", "remove_stale_temporaries", "rng_state", "set_rng_state", "temporary_path"]

PathLike = Union[str, os.PathLike]


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a torn file: write a temporary file in the same directory, fsync it,
    ``os.replace`` it over ``path`` (atomic on POSIX) and fsync the directory so the rename is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_save` (and the log rewrite) stage ``path``: a hidden file named after this process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Delete the temporary files that writers of ``path`` killed mid-write (SIGKILL skips the cleanup in
    :func:`atomic_save`) left next to it: ``.<name>.tmp<pid>`` of processes that no longer run. Returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name[len(f".{path.name}.tmp"):]
        if not pid.isdigit() or (int(pid) != os.getpid() and _process_alive(int(pid))):
            continue  # not ours, or a live writer's: leave it
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True



def rng_state(device: torch.device) -> Dict[str, Any]:
    """torch's CPU (and ``device``'s CUDA), Python's and NumPy's RNG states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
