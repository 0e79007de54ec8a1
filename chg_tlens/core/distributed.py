"""Data-parallel gate fits with torch.distributed: each process takes a slice of every batch.

Launch with ``torchrun --nproc-per-node N -m chg_tlens fit ...`` (gloo on CPU, nccl on GPU). Every
process holds the whole frozen model and all gates; after each backward the gate gradients are averaged,
so every process takes the same Adam step and the gates equal a one-process fit on the same global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only the main process writes files and prints."""
    return world()[0] == 0


def init_from_environment(device: str | None = None) -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); True if one is running."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def local_slice(index: Int[Tensor, " batch"]) -> Int[Tensor, " local"]:
    """This process's contiguous share of a global batch (shares differ by at most one example: the fit
    divides each process's weighted sum by the whole batch's weight, so uneven shares add up exactly)."""
    rank, size = world()
    if size == 1:
        return index
    return torch.tensor_split(index, size)[rank]


def average_(tensor: Tensor) -> Tensor:
    """All-reduce to the mean over processes, in place (a no-op in one process)."""
    _, size = world()
    if size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(size)
    return tensor
