"""Building a run's parts from its config: data, policy and EMA, batch size, LR schedule.

One function per part, each usable alone; :class:`~diffusion_policy.training.trainer.Trainer`
calls them in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.training.builders import build_policy
from diffusion_policy.training.config_checks import ConfigError
from diffusion_policy.training.distributed import DistInfo, main_rank_first
from diffusion_policy.training.ema import EMA
from diffusion_policy.training.time_budget import TimeBudget, budget_lr_schedule


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """The batch of one rank: ``trainer.batch_size`` is the global batch.

    Raises:
        ConfigError: The global batch does not split evenly over the ranks.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"trainer.batch_size={batch_size} (the global batch) must be divisible "
            f"by the number of processes, WORLD_SIZE={world_size}"
        )
    return batch_size // world_size


def build_data(cfg: DictConfig, dist: DistInfo) -> tuple[Any, Any, dict[str, Any]]:
    """The train and validation datasets (split by whole episodes) and their shape description.

    Rank 0 builds the dataset first: it downloads or generates a missing store (the dataset's
    ``prepare_store``); the other ranks then read it.
    """
    with main_rank_first(dist):
        dataset = instantiate(cfg.dataset)
    shape_meta = OmegaConf.to_container(OmegaConf.create(dataset.shape_meta))
    return dataset, dataset.get_validation_dataset(), shape_meta


def build_policy_and_ema(
    cfg: DictConfig, shape_meta: Mapping[str, Any], normalizer_data: Any, device: torch.device
) -> tuple[torch.nn.Module, EMA | None]:
    """The policy, its normalizer fit on the training data, and its EMA copy if enabled."""
    policy = build_policy(cfg, shape_meta)
    policy.normalizer.fit(normalizer_data)
    policy.to(device)
    ema = EMA(policy, **cfg.ema.params) if cfg.ema.enabled else None
    if cfg.trainer.compile:
        # The denoiser runs at every step and denoising iteration; compiling it fuses its
        # elementwise work (GroupNorm, Mish, FiLM). Parameter names stay the same. Static
        # shapes: one quick compile per batch size, not a slow dynamic-shape one.
        policy.denoiser.compile(dynamic=False)
        if ema is not None:
            ema.model.denoiser.compile(dynamic=False)
    return policy, ema


def build_lr_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, clock: TimeBudget, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over the run: its epochs, or its time budget when it has one."""
    if clock.limited:
        return budget_lr_schedule(
            optimizer,
            clock,
            name=cfg.lr_scheduler.name,
            num_warmup_steps=cfg.lr_scheduler.num_warmup_steps,
        )
    return instantiate(cfg.lr_scheduler)(
        optimizer=optimizer, num_training_steps=steps_per_epoch * cfg.trainer.num_epochs
    )


def checkpoint_bytes(policy: torch.nn.Module) -> int:
    """About the size of one checkpoint: 4 copies of the weights (model, EMA, Adam's moments)."""
    return 4 * sum(p.numel() * p.element_size() for p in policy.parameters())
