"""Data-parallel training under ``torchrun``: the process group, reductions, the device.

Every rank reads its own slice of the rows; gradients and the logged sums are all-reduced,
so one process (``WORLD_SIZE`` unset) and ``n`` processes follow the same arithmetic.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Dist", "all_reduce", "init_distributed", "resolve_device"]


class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int


def init_distributed() -> Dist:
    """The process group of a ``torchrun`` launch (initialized here when needed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(0, 1, 0)


def all_reduce(t: Tensor, world: int, op: Any = None) -> Tensor:
    if world > 1:
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
