"""Several training processes (``torchrun``): process group, ranks, and the few collectives
the trainer uses.

``torchrun --nproc_per_node=N train.py ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; the
trainer then joins a process group (NCCL on GPUs, gloo on CPUs), wraps the U-Net in
DistributedDataParallel, and lets rank 0 alone write files. A plain ``python train.py`` is a
world of one and uses none of this.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "launched_world",
    "join",
    "leave",
    "all_gather_cat",
    "all_agree",
    "mean_over_ranks",
    "barrier",
    "gather_objects",
]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The ranks torchrun set in the environment (a world of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def join(device: torch.device) -> bool:
    """Joins the process group torchrun prepared: NCCL for CUDA devices, gloo for the CPU.
    Returns whether this call created it (and so should :func:`leave` it); False without
    torchrun or when the group exists already."""
    if not launched_world().distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def leave() -> None:
    """Leaves the process group. DistributedDataParallel modules still alive then make the
    process abort at exit: drop references to them first (collected here)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_gather_cat(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on each), concatenated along dim 0 in rank order;
    the same result on every rank. No host round trip with NCCL."""
    if not world.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_agree(ok: bool, world: World, device: torch.device) -> bool:
    """True on every rank when ``ok`` is True on every rank (so that a check failing on one
    rank stops all of them, instead of leaving the others waiting in a collective)."""
    if not world.distributed:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    if not world.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_objects(value, world: World) -> list:
    """``value`` of every rank, in rank order, on every rank (pickled; for small states)."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values
