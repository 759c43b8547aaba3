"""Checks of a run's config values, before anything is built or loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

# <key>: (smallest allowed integer, whether null is allowed). Relations between them (the horizon
# fits n_obs_steps and n_action_steps...) are checked by the dataset and the policy.
_RUN_INT_KEYS = {
    "seed": (0, False),
    "horizon": (1, False),
    "n_obs_steps": (1, False),
    "n_action_steps": (1, False),
}
_TRAINER_INT_KEYS = {
    "num_epochs": (1, False),
    "batch_size": (1, False),
    "num_workers": (0, False),
    "log_every": (1, False),
    "val_every": (0, True),
    "rollout_every": (0, True),
    "checkpoint_every": (0, True),
    "topk": (0, False),
    "max_train_steps_per_epoch": (1, True),
    "max_val_steps": (1, True),
    "max_nonfinite_steps": (1, False),
}


class ConfigError(ValueError):
    """A config value of the wrong type, out of range, or unusable on this machine."""


def check_device(device: str) -> None:
    """Checks that the machine has the device the config asks for, before data loads.

    Raises:
        ConfigError: ``device`` names CUDA on a machine without it.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} but torch.cuda.is_available() is False (no CUDA GPU or driver "
            "here, or a CPU-only torch build): use device=cpu or device=auto"
        )


def check_config(cfg: Mapping[str, Any]) -> None:
    """Checks the run's integer settings and ``trainer.*`` before anything is built.

    Raises:
        ConfigError: Naming the first value of the wrong type or out of range.
    """
    _check_ints(cfg, _RUN_INT_KEYS, prefix="")
    tcfg = cfg.get("trainer") or {}
    _check_ints(tcfg, _TRAINER_INT_KEYS, prefix="trainer.")
    clip = tcfg.get("grad_clip_norm")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or not (0 < clip < math.inf)
    ):
        raise ConfigError(f"trainer.grad_clip_norm={clip!r} must be a finite number > 0 or null")
    minutes = tcfg.get("max_minutes")
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes > 0
    ):
        raise ConfigError(f"trainer.max_minutes={minutes!r} must be a number > 0 or null")
    if cfg.get("noise_scheduler") is not None:
        timesteps = {"num_train_timesteps": (1, False)}
        _check_ints(cfg["noise_scheduler"], timesteps, prefix="noise_scheduler.")


def _check_ints(cfg: Mapping[str, Any], keys: dict[str, tuple[int, bool]], prefix: str) -> None:
    for key, (low, nullable) in keys.items():
        value = cfg.get(key)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            null = " or null" if nullable else ""
            raise ConfigError(f"{prefix}{key}={value!r} must be an integer >= {low}{null}")
