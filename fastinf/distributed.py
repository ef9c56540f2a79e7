"""Processes working together under `torch.distributed` (launched by `torchrun`).

One module holds what several ranks need to agree on: joining and leaving the process
group, this process's rank and the world size, which rank owns which piece of work, and
the collectives that combine their results. Without torchrun every function degrades to
the single-process case (rank 0 of 1), so callers never branch on it.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "contiguous",
    "init_distributed",
    "merge_topk",
    "owned",
    "rank_world",
]

Item = TypeVar("Item")


def init_distributed() -> tuple[int, int]:
    """Join the process group `torchrun` describes (gloo on CPU, nccl on CUDA), if any.

    Returns (rank, world size); (0, 1) when not launched by torchrun.
    """
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        if torch.cuda.is_available():
            # nccl needs one device per rank: the one torchrun assigned to this process.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_group)
    return rank_world()


def _leave_group() -> None:
    """Leave the process group in order at exit: a gloo group left to the interpreter's
    teardown can abort the process after its work is done. (If a rank fails, torchrun
    stops the others, so the barrier cannot wait forever.)"""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(this process's rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for alone)."""
    if rank_world()[1] > 1:
        dist.barrier()


def owned(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """The items rank `rank` of `world` works on: every world-th one, starting at its rank.

    Round-robin keeps the ranks' shares within one item of each other whatever the order,
    and every item belongs to exactly one rank.
    """
    return list(items[rank::world])


def contiguous(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """The items rank `rank` of `world` works on: its slice of `items` cut in `world`
    consecutive parts (sizes within one of each other). Items in dataset order keep each
    rank to its own stretch of the data (its own tar shards, when the data is stored so).
    """
    count = len(items)
    return list(items[rank * count // world : (rank + 1) * count // world])


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order (the one value alone)."""
    world = rank_world()[1]
    if world == 1:
        return [value]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def merge_topk(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest scores [Q, k] over every rank's [Q, k'] candidates, with their indices.

    Missing candidates (index < 0) rank last; ties go to the lower dataset index, so the
    merged lists do not depend on how the rows were split over ranks.
    """
    scores = scores.masked_fill(indices < 0, -math.inf)
    parts = all_gather_objects((scores, indices))
    scores = torch.cat([part[0] for part in parts], dim=1)
    indices = torch.cat([part[1] for part in parts], dim=1)
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _collective_device() -> torch.device:
    """Where tensors must be for the process group's backend: this rank's GPU under nccl."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flat_float64(tensors: Sequence[Tensor], what: str) -> Tensor:
    """The tensors' values in one float64 buffer on the collective device (one collective
    call, whatever their number and devices)."""
    wrong = [str(t.dtype) for t in tensors if t.dtype != torch.float64]
    if wrong:
        raise TypeError(
            f"{what} takes float64 tensors (sums are combined without rounding), got {wrong}; "
            "accumulate in float64."
        )
    device = _collective_device()
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view(tensor.shape))
        offset += count


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Replace each float64 tensor, in place, by its sum over every rank (nothing alone).

    All ranks get the same bits. The tensors may live on any device: they travel in one
    float64 buffer on the backend's device (CPU for gloo, this rank's GPU for nccl).
    """
    if rank_world()[1] == 1:
        return
    flat = _flat_float64(tensors, "all_reduce_sum")
    dist.all_reduce(flat)
    _unflatten_into(flat, tensors)


def broadcast_tensors(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite each float64 tensor, in place, with rank `src`'s (nothing alone); every
    rank passes tensors of the same shapes, in the same order."""
    if rank_world()[1] == 1:
        return
    flat = _flat_float64(tensors, "broadcast_tensors")
    dist.broadcast(flat, src)
    _unflatten_into(flat, tensors)


def broadcast_object(value, src: int = 0):
    """Rank `src`'s `value` (any picklable object) on every rank (`value` itself alone)."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]
