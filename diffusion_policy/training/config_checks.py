"""The schema of a run's settings, and the one check of them before anything is built or loaded.

Types and ranges are declared once, as dataclass fields (:class:`RunSchema`,
:class:`TrainerSchema`, :class:`NoiseSchedulerSchema`), each with its bounds in the field's
metadata; :func:`check_config` walks those fields. The values and their comments live in the
YAML files. :class:`TrainerSchema` is registered in Hydra's ConfigStore as ``trainer/schema``
(:func:`register_configs`, run when ``diffusion_policy.training`` is imported), and
``configs/trainer/default.yaml`` composes over it: a value of the wrong type fails at compose,
naming the key. The window sizes (``horizon``, ``n_obs_steps``, ``n_action_steps``) are checked
by :func:`~diffusion_policy.utils.checks.check_window`, as in the sampler, policy and runner.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from diffusion_policy.utils.checks import check_window


class ConfigError(ValueError):
    """A config value of the wrong type, out of range, or unusable on this machine."""


# The fields have no defaults (MISSING, "???"): the values are set in YAML, once.
def _int(low: int) -> Any:
    """An integer field, at least ``low``."""
    return field(default=MISSING, metadata={"low": low})


def _positive_number() -> Any:
    """A finite number field, greater than 0."""
    return field(default=MISSING, metadata={"positive": True})


@dataclass
class RunSchema:
    """Top-level settings of ``configs/train.yaml`` checked before a run starts."""

    seed: int = _int(0)
    horizon: int = _int(1)  # predicted actions
    n_obs_steps: int = _int(1)  # observation frames conditioning a prediction
    n_action_steps: int = _int(1)  # actions executed per prediction


@dataclass
class TrainerSchema:
    """``configs/trainer/default.yaml``: the trainer's settings (see that file for meanings)."""

    num_epochs: int = _int(1)
    batch_size: int = _int(1)
    num_workers: int = _int(0)
    log_every: int = _int(1)
    val_every: int | None = _int(0)
    rollout_every: int | None = _int(0)
    checkpoint_every: int | None = _int(0)
    topk: int = _int(0)
    grad_clip_norm: float | None = _positive_number()
    max_train_steps_per_epoch: int | None = _int(1)
    max_val_steps: int | None = _int(1)
    max_nonfinite_steps: int = _int(1)
    max_minutes: float | None = _positive_number()
    precision: str = field(default=MISSING, metadata={"choices": ("auto", "fp32", "bf16")})
    compile: bool = MISSING


@dataclass
class NoiseSchedulerSchema:
    """The training schedule settings of ``noise_scheduler`` checked here."""

    num_train_timesteps: int = _int(1)


def register_configs() -> None:
    """Registers :class:`TrainerSchema` in Hydra's ConfigStore as ``trainer/schema``.

    ``configs/trainer/default.yaml`` lists it first in its defaults, so OmegaConf enforces the
    field types at compose. Registering again replaces the entry with the same one.
    """
    ConfigStore.instance().store(group="trainer", name="schema", node=TrainerSchema)


def check_device(device: str) -> None:
    """Checks that the machine has the device the config asks for, before data loads.

    Raises:
        ConfigError: ``device`` names CUDA on a machine without it.
    """
    import torch  # here: registering the schemas should not need torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} but torch.cuda.is_available() is False (no CUDA GPU or driver "
            "here, or a CPU-only torch build): use device=cpu or device=auto"
        )


def check_config(cfg: Mapping[str, Any]) -> None:
    """Checks the run's settings against the schema before anything is built.

    Raises:
        ConfigError: Naming the first value of the wrong type or out of range, or window sizes
            that do not fit together.
    """
    check_fields(RunSchema, cfg, prefix="")
    check_windows(cfg["horizon"], cfg["n_obs_steps"], cfg["n_action_steps"])
    check_fields(TrainerSchema, cfg.get("trainer") or {}, prefix="trainer.")
    if cfg.get("noise_scheduler") is not None:
        check_fields(NoiseSchedulerSchema, cfg["noise_scheduler"], prefix="noise_scheduler.")


def check_windows(horizon: int, n_obs_steps: int, n_action_steps: int) -> None:
    """:func:`~diffusion_policy.utils.checks.check_window`, raising a :class:`ConfigError`.

    Raises:
        ConfigError: A size is out of range, or ``horizon < n_obs_steps - 1 + n_action_steps``.
    """
    try:
        check_window(horizon, n_obs_steps, n_action_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_fields(schema: type, cfg: Mapping[str, Any], prefix: str) -> None:
    """Checks the values of ``cfg`` that ``schema``'s fields with bounds declare.

    Raises:
        ConfigError: Naming the first value of the wrong type or out of range.
    """
    for f in dataclasses.fields(schema):
        nullable = "None" in str(f.type)
        value = cfg.get(f.name)
        if value is None and nullable:
            continue
        name = f"{prefix}{f.name}"
        if "low" in f.metadata:
            _check_int(name, value, f.metadata["low"], nullable)
        elif f.metadata.get("positive"):
            _check_positive(name, value)
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{name}={value!r} must be one of {f.metadata['choices']}")


def _check_int(name: str, value: Any, low: int, nullable: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        null = " or null" if nullable else ""
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}{null}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{name}={value!r} must be a finite number > 0 or null")
