"""torch.distributed set-up for multi-GPU / multi-node training launched by ``torchrun``.

``torchrun`` starts one process per GPU and describes the job in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Without it (``WORLD_SIZE``
unset or 1) every helper here is a no-op and training runs in one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long a rank waits in a collective for the others. Rank 0 alone validates, rolls out
# (50 episodes of 300 steps with 100 denoising steps each can take many minutes) and writes
# checkpoints while the other ranks wait for it in their next gradient all-reduce; torch's
# default (10 minutes for NCCL) would kill the job there.
TIMEOUT = timedelta(hours=2)


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


def env_rank() -> int:
    """This process's rank as ``torchrun`` sets it (0 without ``torchrun``)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(
    device: torch.device, timeout: timedelta = TIMEOUT
) -> tuple[DistInfo, torch.device]:
    """Joins the process group that ``torchrun`` describes in the environment, if any.

    NCCL is used on CUDA (one GPU per process, chosen by ``LOCAL_RANK``), gloo on CPU. Calling it
    again in the same process returns the same answer without joining twice.

    Args:
        device: The device the config asks for.
        timeout: How long a collective waits for the slowest rank (see :data:`TIMEOUT`).

    Returns:
        This process's :class:`DistInfo` and the device it trains on.

    Raises:
        ValueError: The environment describes a job inconsistently.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Binding the GPU lets NCCL set up now, and barriers use it.
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
        log.info("rank %d/%d (local %d) on %s, %s", rank, world_size, local_rank, device, backend)
    return DistInfo(rank, world_size, local_rank), device


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise mean of a tensor over all ranks (NaN or inf on one rank spreads)."""
    if not info.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / info.world_size


def barrier(info: DistInfo) -> None:
    """Waits for every rank."""
    if info.enabled:
        dist.barrier()


@contextmanager
def main_rank_first(info: DistInfo) -> Iterator[None]:
    """Runs the block on rank 0, then on the other ranks (e.g. rank 0 downloads, they read)."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


def shutdown(info: DistInfo) -> None:
    """Leaves the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
