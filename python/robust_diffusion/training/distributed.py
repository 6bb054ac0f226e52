"""Data parallelism for the DDPM kit: joining the process group that torchrun describes."""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "rank_and_world_size"]


def init_distributed(device: Optional[Union[str, torch.device]] = None) -> Tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), if any.

    Returns ``(rank, world_size, device)``. The backend is nccl when the device is a GPU, gloo otherwise;
    each rank of a GPU run takes ``cuda:LOCAL_RANK``. Without torchrun's variables (or with one process)
    nothing is initialised and ``(0, 1, device)`` comes back.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available here (torch.cuda.is_available() is "
                         f"False); use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def rank_and_world_size() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
