"""The run folder: one process at a time, no silent overwrite, and resumes that fit.

A run folder holds ``checkpoints/``, ``logs.jsonl``, ``config.yaml`` (the config of the latest
start or resume) and ``config_changes.jsonl`` (the settings each resume changed).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffusion_policy.training.checkpoint import atomic_write

log = logging.getLogger(__name__)

LATEST = "latest.ckpt"
LOCK = ".lock"

# Settings a resumed run cannot change: the weights, the normalizer and the data windows were
# made with them. A key names itself and everything below it.
FROZEN_KEYS = (
    "horizon",
    "n_obs_steps",
    "n_action_steps",
    "dataset",
    "encoder",
    "denoiser",
    "noise_scheduler.num_train_timesteps",
    "noise_scheduler.beta_start",
    "noise_scheduler.beta_end",
    "noise_scheduler.beta_schedule",
    "noise_scheduler.trained_betas",
    "noise_scheduler.prediction_type",
)
# Under a frozen key, but where a resume may point elsewhere (the data moved); logged.
MOVABLE_KEYS = ("dataset.zarr_path",)
# Keys whose change says nothing about the run.
IGNORED_KEYS = ("resume",)
_ABSENT = "<absent>"


class RunFolderError(RuntimeError):
    """The run folder is in use, holds another run, or cannot be resumed as asked."""


class RunFolderLock:
    """An exclusive lock on a run folder (``flock`` on ``<run_dir>/.lock``), one process at a time.

    The lock file holds the holder's pid and host, for the message another process gets. The
    operating system releases the lock when the process dies, however it dies.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or fails at once.

        Raises:
            RunFolderError: Another process holds it; the message names that process.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path.parent} is in use by {holder} (lock {self.path}): "
                "wait for that run to end, or choose another folder (hydra.run.dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (a no-op when not held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def find_resume_checkpoint(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, after checking that the folder fits ``resume``.

    Args:
        run_dir: The run folder.
        resume: Whether the config asks to continue the run in ``run_dir``.

    Returns:
        ``checkpoints/latest.ckpt`` when resuming, None for a new run.

    Raises:
        RunFolderError: A new run into a folder that holds a run's checkpoints or logs, or a
            resume without ``latest.ckpt``; the message says what is there and what to do.
    """
    run_dir = Path(run_dir)
    latest = run_dir / "checkpoints" / LATEST
    found = _run_files(run_dir)
    if not resume:
        if found:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(found)}); a new run would "
                f"overwrite its checkpoints and mix its logs. Continue it with resume=true "
                f"hydra.run.dir={run_dir}, or choose another folder (hydra.run.dir=...)"
            )
        return None
    if latest.is_file():
        return latest
    if not found:
        there = "the folder is empty or new: it holds no checkpoints or logs of a run"
    else:
        there = f"it holds {', '.join(found)} but no {LATEST}"
    raise RunFolderError(
        f"resume=true but there is no {latest} to resume from: {there}. Check hydra.run.dir, "
        "or drop resume=true and start a new run in another folder"
    )


def _run_files(run_dir: Path) -> list[str]:
    """What of a previous run is in ``run_dir``: its checkpoints and its non-empty log."""
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    found = [f"checkpoints/{name}" for name in ckpts]
    log_file = run_dir / "logs.jsonl"
    if log_file.is_file() and log_file.stat().st_size > 0:
        found.append("logs.jsonl")
    return found


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, prefix=f"{name}.")
        else:
            flat[name] = value
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two resolved configs: ``{dotted key: (old, new)}``."""
    before, after = flatten(old), flatten(new)
    changes = {}
    for key in sorted(before.keys() | after.keys()):
        if _under(key, IGNORED_KEYS):
            continue
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if a != b:
            changes[key] = (a, b)
    return changes


def split_frozen(
    changes: Mapping[str, tuple[Any, Any]],
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(changes a resume must refuse, changes it may apply); see :data:`FROZEN_KEYS`."""
    frozen = {k: v for k, v in changes.items() if _under(k, FROZEN_KEYS) and k not in MOVABLE_KEYS}
    return frozen, {k: v for k, v in changes.items() if k not in frozen}


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``"optimizer.lr: 0.0001 -> 0.001; horizon: 16 -> 8"``."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume_config(
    stored: Mapping[str, Any] | None, new: Mapping[str, Any], checkpoint: Path
) -> dict[str, tuple[Any, Any]]:
    """Compares a checkpoint's stored config with the resumed run's.

    Args:
        stored: The checkpoint's ``config`` entry (None for a checkpoint without one).
        new: The resumed run's resolved config.
        checkpoint: The checkpoint's path, for messages.

    Returns:
        The changed settings the resume applies, ``{key: (old, new)}``.

    Raises:
        RunFolderError: A change of a setting the weights or data depend on (:data:`FROZEN_KEYS`);
            the message lists every such key with its old and new value.
    """
    if stored is None:
        log.warning("%s stores no config: the resumed settings cannot be compared", checkpoint)
        return {}
    frozen, applied = split_frozen(config_changes(stored, new))
    if frozen:
        raise RunFolderError(
            f"resume=true refused: {checkpoint} was trained with other values of settings its "
            f"weights and data depend on: {describe_changes(frozen)}. Resume with the stored "
            f"values, or start a new run in another folder (hydra.run.dir=...)"
        )
    if applied:
        log.warning("resuming with changed settings (applied): %s", describe_changes(applied))
    return applied


def record_config(
    run_dir: str | Path,
    config: Mapping[str, Any],
    changes: Mapping[str, tuple[Any, Any]] | None = None,
    step: int | None = None,
) -> None:
    """Writes ``config.yaml`` (the config now in force) and appends a resume's changes.

    Args:
        run_dir: The run folder.
        config: The resolved config of this start or resume.
        changes: Settings a resume changed, appended to ``config_changes.jsonl``.
        step: The step the resume continues from.
    """
    run_dir = Path(run_dir)
    text = OmegaConf.to_yaml(OmegaConf.create(dict(config))).encode()
    atomic_write(run_dir / "config.yaml", lambda f: f.write(text))
    if changes:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "step": step,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
        }
        with open(run_dir / "config_changes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
