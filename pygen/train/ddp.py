"""torchrun glue: process group from the environment, DDP wrapping, small collectives.

Under ``torchrun`` (WORLD_SIZE > 1) :func:`setup` initialises the default process group from
the env:// variables (NCCL for CUDA devices, gloo for CPU) unless it already exists. One
process is one rank with one device (``cuda:LOCAL_RANK``, or the CPU).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistInfo", "setup", "teardown", "wrap", "mean_over_ranks", "gather_objects", "broadcast_flag",
           "job_lock"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it at the end

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | torch.device | None = None) -> DistInfo:
    """Resolve the device and, when WORLD_SIZE > 1, join (or create) the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, device, False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown(info: DistInfo, *, failed: bool = False) -> None:
    """Destroy the process group we created. After a normal end all ranks meet at a barrier
    first: a rank that tore gloo down while another was still in its last collective made
    that one abort ("terminate called without an active exception")."""
    if info.owns_group and dist.is_initialized():
        # the DDP wrapper (gone with fit's frame, but held by reference cycles until a
        # collection) must not outlive the group: its reducer, destroyed at interpreter exit
        # after the group, aborted the process now and then
        gc.collect()
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the model when distributed (it broadcasts rank 0's weights and buffers now,
    and all-reduces gradients in backward), else the model itself."""
    if not info.distributed:
        return model
    # a model whose step runs sub-networks in separate forward calls (a GAN's D and G phases)
    # leaves parameters unused in each call: it says so with ddp_find_unused_parameters
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                   find_unused_parameters=getattr(model, "ddp_find_unused_parameters", False))


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over ranks (one all-reduce), so every rank logs and checks the same."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)  # SUM: gloo has no AVG
        values /= info.world_size
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's flag on every rank (a decision taken by rank-0-only code, such as a callback's
    stop request, that every rank must follow)."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


@contextmanager
def job_lock(directory: str | os.PathLike, info: DistInfo, what: str) -> Iterator[None]:
    """Hold ``directory`` for this job (:func:`pygen._lock.lock_directory`). Under torchrun
    rank 0 takes the lock and every rank learns whether it got it, so that all ranks of a
    refused job raise :class:`pygen._lock.DirectoryBusy` before any writes."""
    from pygen._lock import DirectoryBusy, lock_directory

    with ExitStack() as stack:
        refused: Exception | None = None
        if info.is_main:
            try:
                stack.enter_context(lock_directory(directory, what))
            except (DirectoryBusy, OSError) as e:  # OSError: an unwritable directory; tell the ranks too
                refused = e
        if broadcast_flag(refused is not None, info):
            raise refused or DirectoryBusy(f"{what} {directory}: rank 0 could not take the job's lock (see its error)")
        yield

