"""torch.distributed set-up for multi-GPU / multi-node training launched by ``torchrun``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Joins the process group that ``torchrun`` describes in the environment, if any.

    NCCL is used on CUDA (one GPU per process, chosen by ``LOCAL_RANK``), gloo on CPU.

    Args:
        device: The device the config asks for.

    Returns:
        This process's :class:`DistInfo` and the device it trains on.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d/%d (local %d) on %s", rank, world_size, local_rank, device)
    return DistInfo(rank, world_size, local_rank), device


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a scalar over all ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def barrier(info: DistInfo) -> None:
    """Waits for every rank."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leaves the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
