"""Resuming a run: opening its folder, and loading a checkpoint's state into the run's parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.training.checkpoint import (
    CheckpointError,
    check_writable,
    load_checkpoint,
    load_model_state,
    remove_stale_temp_files,
)
from diffusion_policy.training.distributed import DistInfo, gather_objects
from diffusion_policy.training.ema import EMA
from diffusion_policy.training.run_dir import (
    RunFolderLock,
    check_resume_config,
    find_resume_checkpoint,
    record_config,
)

# The entries of a checkpoint that a resume reads.
RESUME_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "global_step")


def open_run_folder(
    cfg: DictConfig, run_dir: Path, lock: RunFolderLock, is_main: bool
) -> tuple[Path, dict[str, Any]] | None:
    """Locks the folder (rank 0), checks that it fits ``cfg.resume``, and records the config.

    Returns:
        The checkpoint to resume from and its state, or None for a new run.

    Raises:
        RunFolderError: The folder is in use, holds another run, has nothing to resume,
            or the resume changes a setting the checkpoint's weights depend on.
        CheckpointError: The checkpoint to resume from is corrupt or lacks an entry.
    """
    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        lock.acquire()
        # Fail before hours of training, not at the first checkpoint.
        check_writable(ckpt_dir)
        remove_stale_temp_files(ckpt_dir)
    path = find_resume_checkpoint(run_dir, bool(cfg.resume))
    config = OmegaConf.to_container(cfg, resolve=True)
    state, changes = None, {}
    if path is not None:
        state = load_checkpoint(path)
        missing = [key for key in RESUME_KEYS if key not in state]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} has no {', '.join(map(repr, missing))} entry: it cannot "
                "be resumed from (was it written by this trainer?)"
            )
        changes = check_resume_config(state.get("config"), config, path)
    if is_main:
        # Only now that the resume is accepted: config.yaml tells what this run trains with.
        step = int(state["global_step"]) if state is not None else None
        record_config(run_dir, config, changes, step=step)
    return (path, state) if state is not None else None


def load_training_state(
    path: Path,
    state: dict[str, Any],
    policy: torch.nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Loads a checkpoint's weights, EMA, optimizer and schedule; the config's settings win.

    Raises:
        CheckpointError: The weights do not fit, or EMA is on but the checkpoint has none.
    """
    load_model_state(policy, state["model"], what=f"checkpoint {path}")
    if ema is not None:
        if not state.get("ema"):
            raise CheckpointError(f"checkpoint {path} has no EMA weights but ema.enabled=true")
        ema.load_state_dict(state["ema"])
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    apply_optimizer_settings(optimizer, settings, lr_scheduler)


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    settings: list[dict[str, Any]],
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Puts the config's optimizer settings back after loading a checkpoint's optimizer state.

    ``load_state_dict`` restores the saved hyperparameters; a resumed run that changed
    ``optimizer.lr`` or ``weight_decay`` trains with the new ones. The learning rate keeps its
    place in the schedule: the current rate is scaled by new base rate / old base rate.

    Args:
        optimizer: The optimizer, after ``load_state_dict``.
        settings: Each param group's settings as the config built them (without ``params``).
        lr_scheduler: The schedule, after ``load_state_dict``.
    """
    for i, (group, fresh) in enumerate(zip(optimizer.param_groups, settings, strict=True)):
        for key, value in fresh.items():
            if key not in ("lr", "initial_lr"):
                group[key] = value
        old_base, new_base = lr_scheduler.base_lrs[i], fresh.get("initial_lr", fresh["lr"])
        if old_base != new_base and old_base > 0:
            group["lr"] *= new_base / old_base
            group["initial_lr"] = lr_scheduler.base_lrs[i] = new_base
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_ranks_agree(global_step: int, dist: DistInfo, run_dir: Path) -> None:
    """Checks that every rank resumed at the same step (they read the same run folder).

    Raises:
        CheckpointError: Listing each rank's step.
    """
    if dist.enabled:
        steps = gather_objects(global_step, dist)
        if len(set(steps)) > 1:
            raise CheckpointError(
                f"the ranks resumed at different steps {steps}: every node must see the "
                f"same run folder {run_dir} (a shared file system)"
            )
