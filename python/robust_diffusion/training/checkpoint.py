"""Files the kit writes and reads back: crash-safe, and safe to open.

A state file (the Trainer's checkpoint, the evaluation classifier's cache) is one safetensors file: the tensors
in safetensors' format, everything else (numbers, strings, the nesting of dicts, lists and tuples) as JSON in its
header, with the file's kind and format version. Opening one never runs code, unlike a pickle (``torch.save``),
so a checkpoint from someone else is as safe to resume as one's own; a pickle file is refused, not opened.
Writes never leave a torn file: a temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory. Also here: the RNG states a checkpoint must carry for an exact resume.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["StateFileError", "atomic_write", "load_state", "remove_stale_temporaries", "rng_state", "save_state",
           "set_rng_state", "temporary_path"]

PathLike = Union[str, os.PathLike]
#: The header entry naming what a state file holds, and the format version of its layout.
_KIND_KEY, _VERSION_KEY, _TREE_KEY = "robust_diffusion.kind", "robust_diffusion.version", "robust_diffusion.tree"


class StateFileError(ValueError):
    """A file that is not a state file of the expected kind and version: ``path`` and a one-line ``reason``."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def save_state(state: Dict[str, Any], path: PathLike, kind: str, version: int) -> None:
    """Write ``state`` (nested dicts, lists and tuples of tensors, numbers, strings, bools, None and NumPy arrays)
    to ``path`` as one safetensors file that :func:`load_state` reads back, atomically."""
    tensors: Dict[str, Tensor] = {}
    tree = _encode(state, tensors)
    metadata = {_KIND_KEY: kind, _VERSION_KEY: str(version), _TREE_KEY: json.dumps(tree, allow_nan=True)}
    from safetensors.torch import save
    atomic_write(save(tensors, metadata), path)


def load_state(path: PathLike, kind: str, version: int) -> Dict[str, Any]:
    """What :func:`save_state` wrote to ``path``, with tensors on the CPU. A file of another kind or version, a
    pickle (``torch.save``) or a damaged file raises :class:`StateFileError`, a one-line reason; nothing in the
    file is ever executed."""
    raw = Path(path).read_bytes()
    metadata = _metadata(raw, path)
    if metadata.get(_KIND_KEY) != kind:
        raise StateFileError(path, f"it is a {metadata.get(_KIND_KEY) or 'safetensors file of another program'}, "
                                   f"not a {kind}")
    if metadata.get(_VERSION_KEY) != str(version):
        raise StateFileError(path, f"it is a {kind} of format version {metadata.get(_VERSION_KEY)}; this version "
                                   f"of robust_diffusion reads version {version}")
    from safetensors.torch import load
    try:
        tensors = load(raw)
        tree = json.loads(metadata[_TREE_KEY])
        return _decode(tree, tensors)
    except Exception as error:  # a damaged file: say so in one line
        raise StateFileError(path, f"it is damaged ({type(error).__name__}: {_first_line(error)})") from None


def _metadata(raw: bytes, path: PathLike) -> Dict[str, str]:
    """The safetensors header's metadata, or a one-line refusal naming what the file is instead. The header is read
    first: its 8-byte length can begin with any byte, a pickle's marks included."""
    header = None
    if len(raw) >= 8:
        (size,) = struct.unpack("<Q", raw[:8])
        if size <= len(raw) - 8 and raw[8:9] == b"{":
            try:
                header = json.loads(raw[8:8 + size])
            except ValueError:
                header = None
    if isinstance(header, dict):
        metadata = header.get("__metadata__") or {}
        return metadata if isinstance(metadata, dict) else {}
    if raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
        raise StateFileError(path, "it is a pickle (torch.save) file, from an older version of robust_diffusion or "
                                   "another program, and is not opened: unpickling can run code")
    if len(raw) < 8:
        raise StateFileError(path, f"it is not a safetensors file ({len(raw)} bytes)")
    raise StateFileError(path, "it is not a safetensors file, or it is truncated")


def _encode(value: Any, tensors: Dict[str, Tensor]) -> Any:
    """JSON for ``value``, its tensors moved into ``tensors`` under the names the JSON refers to."""
    if isinstance(value, Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        return {"ndarray": _encode(torch.from_numpy(value.astype(value.dtype.newbyteorder("="))), tensors),
                "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {"dict": [[_encode(key, tensors), _encode(item, tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(item, tensors) for item in value]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"save_state: cannot store a {type(value).__name__}")


def _decode(tree: Any, tensors: Dict[str, Tensor]) -> Any:
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "ndarray" in tree:
        return _decode(tree["ndarray"], tensors).numpy().astype(np.dtype(tree["dtype"]))
    if "dict" in tree:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in tree["dict"]}
    if "list" in tree:
        return [_decode(item, tensors) for item in tree["list"]]
    return tuple(_decode(item, tensors) for item in tree["tuple"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def atomic_write(data: bytes, path: PathLike) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one, never a torn
    one: a temporary file in the same directory, fsync, ``os.replace`` (atomic on POSIX), fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
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
    """Where :func:`atomic_write` (and the log rewrite) stage ``path``: a hidden file named after this process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Delete the temporary files that writers of ``path`` killed mid-write (SIGKILL skips the cleanup in
    :func:`atomic_write`) left next to it: ``.<name>.tmp<pid>`` of processes that no longer run. Returns them."""
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
