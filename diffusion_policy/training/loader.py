"""Training batches: a resumable shuffle split over ranks, the loader, and moving to a device."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from diffusion_policy.training.config_checks import ConfigError
from diffusion_policy.training.distributed import DistInfo


class ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler` whose next epoch can start some batches in.

    A run interrupted mid-epoch resumes with the rest of that epoch's batches: the shuffle
    depends on (seed, epoch) only, so skipping the first ``skip_batches`` of it continues
    exactly where the run stopped, without loading the skipped data.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.skip_batches = 0  # for the next epoch only

    def set_epoch(self, epoch: int) -> None:
        """This epoch's shuffle, the same on every rank."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        return itertools.islice(iter(self.sampler), start, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip_batches * self.batch_size


def make_train_sampler(
    dataset: Any, dist: DistInfo, seed: int, batch_size: int
) -> ResumableSampler:
    """This rank's share of every epoch's shuffle, in batches of ``batch_size``.

    Rank r takes every world_size-th window of an epoch's shuffle, so one step of all ranks
    sees the batch a single process would. The shuffle depends on (seed, epoch) only
    (``set_epoch``), so a resumed run sees the same batches as an uninterrupted one.
    """
    sampler = DistributedSampler(
        dataset,
        num_replicas=dist.world_size,
        rank=dist.rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    return ResumableSampler(sampler, batch_size)


def _collate_batch(batch: Any) -> Any:
    """The dataset's ``__getitems__`` already returns a batch; nothing to collate."""
    return batch


def make_loader(
    dataset: Any,
    batch_size: int,
    tcfg: DictConfig,
    device: torch.device,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    """Batches of ``batch_size``; in order (and the last one short) without a sampler."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=sampler is not None,
        num_workers=tcfg.num_workers,
        persistent_workers=tcfg.num_workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=_collate_batch,
    )


def count_steps_per_epoch(loader: DataLoader, tcfg: DictConfig) -> int:
    """Optimizer steps per epoch: full batches, capped by ``max_train_steps_per_epoch``.

    Raises:
        ConfigError: Not one full batch fits in the training windows.
    """
    steps = len(loader)
    if steps == 0:
        raise ConfigError(
            f"trainer.batch_size={tcfg.batch_size} is larger than the "
            f"{len(loader.dataset)} training windows: not one full batch per epoch"
        )
    return min(steps, tcfg.max_train_steps_per_epoch or steps)


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves a nested dict of tensors to ``device``."""
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def batches(loader: DataLoader, device: torch.device, max_steps: int | None) -> Iterator[Any]:
    """The loader's batches on ``device``, at most ``max_steps`` of them (None: all)."""
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            return
        yield to_device(batch, device)
