"""Builds objects from configs read back from files (checkpoints), calling only trusted classes.

A config the user composed may name any ``_target_``: that is their code. A config stored in
a checkpoint is data from outside: handing it to Hydra's ``instantiate`` would import and call
whatever it names. So every ``_target_`` in it is checked first, without importing anything the
config names, against what the project chose: its own encoders, denoisers and env runners, and
diffusers' noise schedulers. Anything else is refused with the key that holds it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import diffusers
from diffusers import SchedulerMixin
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_policy.training.checkpoint import CheckpointError

# The project's packages whose classes a stored config may build.
TRUSTED_PACKAGES = (
    "diffusion_policy.encoders",
    "diffusion_policy.denoisers",
    "diffusion_policy.envs",
)


class UntrustedConfigError(CheckpointError):
    """A stored config names a ``_target_`` outside the trusted classes."""


def instantiate_stored(
    cfg: Mapping[str, Any], where: str, trusted: Iterable[str] = (), **kwargs: Any
) -> Any:
    """``hydra.utils.instantiate`` for a config read from a file, after :func:`check_targets`.

    Args:
        cfg: The stored config of one object (e.g. a checkpoint's ``denoiser``).
        where: Its key in the stored config, for error messages.
        trusted: Extra fully qualified class names the user trusts (e.g. their own encoder).
        **kwargs: Arguments passed to the constructor, as with ``instantiate``.

    Raises:
        UntrustedConfigError: A ``_target_`` is not a trusted class.
    """
    plain = to_plain(cfg, where)
    check_targets(plain, where, trusted)
    return instantiate(plain, **kwargs)


def to_plain(cfg: Any, where: str) -> Any:
    """The stored config as plain dicts and lists, interpolations resolved."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping | list):
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    raise UntrustedConfigError(f"stored config {where} is a {type(cfg).__name__}, not a mapping")


def check_targets(node: Any, where: str, trusted: Iterable[str] = ()) -> None:
    """Checks every ``_target_`` in ``node`` (nested ones included) is a trusted class.

    Raises:
        UntrustedConfigError: Naming the key and the target refused.
    """
    trusted = set(trusted)
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}"
            if key == "_target_":
                _check_target(value, path, trusted)
            else:
                check_targets(value, path, trusted)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]", trusted)


def _check_target(target: Any, path: str, trusted: set[str]) -> None:
    if not isinstance(target, str):
        raise UntrustedConfigError(f"{path}={target!r} must be a class name")
    if target in trusted or _is_project_class(target) or _is_diffusers_scheduler(target):
        return
    raise UntrustedConfigError(
        f"{path}={target!r} is refused: a stored config may only build the project's encoders, "
        f"denoisers and env runners ({', '.join(TRUSTED_PACKAGES)}) and diffusers noise "
        f"schedulers. If you trust this file and this class, pass it in trusted_targets"
    )


def _is_project_class(target: str) -> bool:
    module_name, _, name = target.rpartition(".")
    if not module_name.startswith(tuple(p + "." for p in TRUSTED_PACKAGES)):
        return False
    if not name.isidentifier() or name.startswith("_"):
        return False
    try:  # the project's own module: importing it runs only the project's code
        obj = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return False
    # Defined there (not a name it imported, like functools.partial), and a class.
    return inspect.isclass(obj) and obj.__module__ == module_name


def _is_diffusers_scheduler(target: str) -> bool:
    prefix, _, name = target.rpartition(".")
    if prefix not in ("diffusers", "diffusers.schedulers") or not name.endswith("Scheduler"):
        return False
    obj = getattr(diffusers, name, None)
    return inspect.isclass(obj) and issubclass(obj, SchedulerMixin)
