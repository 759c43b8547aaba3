"""Checkpoints: tensors and plain data, written atomically, loaded without unpickling objects."""

from __future__ import annotations

import errno
import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from diffusion_policy.utils.atomic import TMP_SUFFIX, atomic_write

log = logging.getLogger(__name__)

__all__ = [  # atomic_write is re-exported: callers of the checkpoint API find it here too
    "CheckpointError",
    "CheckpointWriteError",
    "NonFiniteCheckpointError",
    "TopKCheckpoints",
    "atomic_write",
    "check_writable",
    "describe_os_error",
    "load_checkpoint",
    "load_model_state",
    "nonfinite_tensors",
    "remove_stale_temp_files",
    "save_checkpoint",
    "warn_if_low_disk",
]

FORMAT_VERSION = 1
# The first bytes of a file written by torch.save (a zip archive).
_ZIP_MAGIC = b"PK\x03\x04"
# errno -> what the user can do about it.
_ADVICE = {
    errno.ENOSPC: "free disk space there",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "the file size limit (ulimit -f) is too low for it",
    errno.EACCES: "make the folder writable, or choose another run folder (hydra.run.dir=...)",
    errno.EPERM: "make the folder writable, or choose another run folder (hydra.run.dir=...)",
    errno.EROFS: "the file system is read-only; choose another run folder (hydra.run.dir=...)",
    errno.ENOTDIR: "a file is in the way of the folder; move it or choose another run folder",
    errno.EEXIST: "a file is in the way of the folder; move it or choose another run folder",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, no permission...).

    The file previously at the destination, if any, is untouched and still loads.
    """


class NonFiniteCheckpointError(CheckpointError):
    """A state to save holds NaN or inf; nothing was written.

    The file previously at the destination, if any, is untouched and still loads.
    """


def describe_os_error(e: OSError) -> str:
    """``"[ENOSPC] No space left on device"`` plus advice, for an error message."""
    name = errno.errorcode.get(e.errno or 0, "unknown errno")
    advice = _ADVICE.get(e.errno or 0)
    text = f"[{name}] {e.strerror or e}"
    return f"{text}: {advice}" if advice else text


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Deletes the temporary files that writers killed midway left in ``directory``.

    Only one process writes a run's checkpoints, so call this before it starts writing.

    Returns:
        The files removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [
        p
        for p in directory.iterdir()
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()
    ]
    for p in stale:
        p.unlink(missing_ok=True)
        log.warning("removed %s, left by a checkpoint write that did not finish", p)
    return stale


def check_writable(directory: str | Path) -> None:
    """Creates ``directory`` and writes a probe file there, so a run fails before training.

    Raises:
        CheckpointWriteError: The folder cannot be created or written, with what to do about it.
    """
    directory = Path(directory)
    probe = directory / ".write_probe"
    try:
        atomic_write(probe, lambda f: f.write(b"ok"))
        probe.unlink()
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoints to {directory}: {describe_os_error(e)}"
        ) from None


def warn_if_low_disk(directory: str | Path, bytes_needed: int) -> None:
    """Logs a warning when ``directory``'s file system has less than ``bytes_needed`` free."""
    free = shutil.disk_usage(directory).free
    if free < bytes_needed:
        log.warning(
            "only %.2f GB free in %s; this run's checkpoints need about %.2f GB",
            free / 1e9,
            directory,
            bytes_needed / 1e9,
        )


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Saves a dict of tensors, state dicts and plain Python data atomically.

    Every floating-point tensor in ``state`` (model, EMA, optimizer moments...) must be finite:
    a checkpoint holding NaN or inf would poison every run resumed from it.

    Raises:
        NonFiniteCheckpointError: A tensor holds NaN or inf (the message names the first one);
            nothing is written and the checkpoint previously at ``path``, if any, is untouched.
        CheckpointWriteError: The file cannot be written (disk full, no permission...); the
            checkpoint previously at ``path``, if any, is untouched.
    """
    path = Path(path)
    kept = f"; the previous {path.name} is untouched" if path.exists() else ""
    bad = _first_nonfinite(state)
    if bad is not None:
        key, tensor = bad
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteCheckpointError(
            f"not saving checkpoint {path}: {key} (shape {tuple(tensor.shape)}) holds "
            f"{n_bad} NaN/inf values{kept}"
        )
    state = {"format_version": FORMAT_VERSION, **state}
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {describe_os_error(e)}{kept}"
        ) from e


def _first_nonfinite(state: Any) -> tuple[str, torch.Tensor] | None:
    """The key path and tensor of the first floating tensor holding NaN/inf, or None."""
    for key, tensor in _tensors(state, ""):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            return key, tensor
    return None


def _tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) of every tensor nested in dicts, lists and tuples: ``ema/layer.w``."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<state>", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def nonfinite_tensors(state: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The names of the floating-point tensors in a nested state dict that hold NaN or inf."""
    bad = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            bad += nonfinite_tensors(value, prefix=f"{name}.")
        elif (
            torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
        ):
            bad.append(name)
    return bad


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    Only tensors and plain data are accepted (``torch.load(weights_only=True)``): a file that
    would unpickle arbitrary objects is refused without running them.

    Raises:
        CheckpointError: The file is missing, not a torch file, truncated, corrupt or holds
            unsafe objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        # torch.save writes a zip archive; anything else (random bytes, a plain pickle, a
        # text file) is not a checkpoint, whatever torch.load's error would suggest.
        raise CheckpointError(
            f"{path} is not a checkpoint: not a file written by torch.save (it starts with "
            f"{head!r}, a torch file with {_ZIP_MAGIC!r})"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data; refused to "
            f"load it ({first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {e}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a diffusion_policy checkpoint")
    return state


def load_model_state(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str
) -> None:
    """``model.load_state_dict`` with an error that names every mismatching key and shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        raise CheckpointError(
            f"{what} does not fit this config ({len(shapes)} shape mismatches, {len(missing)} "
            f"missing, {len(unexpected)} unexpected): " + ", ".join(parts)
        )
    model.load_state_dict(state_dict)


class TopKCheckpoints:
    """Keeps the k best checkpoints of a run by a score (higher is better).

    Files are named ``epoch_EEEE-<metric>_S.SSS.ckpt`` inside ``directory``: no ``=``, so the
    path can be pasted into a Hydra override (``scripts/eval.py checkpoint=PATH``). The set is
    rebuilt from the file names, so it survives a resume; the names of older runs,
    ``epoch=EEEE-<metric>=S.SSS.ckpt``, are recognised too.
    """

    def __init__(self, directory: str | Path, k: int, metric: str = "test_mean_score") -> None:
        self.directory = Path(directory)
        self.k = k
        self.metric = metric
        self._pattern = re.compile(rf"epoch[_=](\d+)-{re.escape(metric)}[_=](-?[\d.]+)\.ckpt$")

    def filename(self, epoch: int, score: float) -> str:
        """``epoch_0049-test_mean_score_0.691.ckpt``."""
        return f"epoch_{epoch:04d}-{self.metric}_{score:.3f}.ckpt"

    def existing(self) -> list[tuple[float, Path]]:
        """(score, path) of the kept checkpoints, best first."""
        found = []
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                m = self._pattern.match(p.name)
                if m:
                    found.append((float(m.group(2)), p))
        return sorted(found, key=lambda sp: sp[0], reverse=True)

    def best(self) -> Path | None:
        """Path of the best checkpoint, if any."""
        kept = self.existing()
        return kept[0][1] if kept else None

    def save(self, epoch: int, score: float, state: dict[str, Any]) -> Path | None:
        """Saves ``state`` if ``score`` is among the k best; drops the checkpoint it displaces."""
        if self.k <= 0:
            return None
        kept = self.existing()
        if len(kept) >= self.k and score <= kept[-1][0]:
            return None
        path = self.directory / self.filename(epoch, score)
        save_checkpoint(path, state)
        for _, old in [sp for sp in kept if sp[1] != path][self.k - 1 :]:
            old.unlink(missing_ok=True)
        return path
