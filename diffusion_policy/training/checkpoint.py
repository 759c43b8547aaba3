"""Checkpoints: tensors and plain data, written atomically, loaded without unpickling objects."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# Temporary files of atomic_write: ".<name>.<random>.tmp" next to the destination.
_TMP_SUFFIX = ".tmp"
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


def describe_os_error(e: OSError) -> str:
    """``"[ENOSPC] No space left on device"`` plus advice, for an error message."""
    name = errno.errorcode.get(e.errno or 0, "unknown errno")
    advice = _ADVICE.get(e.errno or 0)
    text = f"[{name}] {e.strerror or e}"
    return f"{text}: {advice}" if advice else text


def atomic_write(path: str | Path, write: Any) -> None:
    """Writes a file through a temporary sibling, fsync and rename: it is complete or absent.

    If the write fails or the process dies midway, ``path`` keeps its previous content; a dead
    process can leave a ``.<name>.*.tmp`` sibling, which :func:`remove_stale_temp_files` deletes.

    Args:
        path: Destination.
        write: Callable taking a binary file object (``write``, ``writelines``, ``flush``).

    Raises:
        OSError: The folder cannot be created or written, e.g. ENOSPC when the disk is full
            (the partial temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            write(_FullWriter(f))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        disk_error = _os_error_in_chain(e)
        if disk_error is not None and disk_error is not e:
            # torch.save reports a failed write as a RuntimeError ("unexpected pos"); the
            # OSError that says why (e.g. ENOSPC) is its context.
            raise OSError(disk_error.errno, disk_error.strerror, str(tmp)) from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _FullWriter:
    """A binary file whose ``write`` writes everything or raises (a full disk: ENOSPC).

    An unbuffered file may write fewer bytes than asked when the disk fills up and only raise
    on the next call; writers like ``torch.save`` then fail with a confusing error.
    """

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            view = view[self._f.write(view) :]
        return size

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Nothing is buffered."""


def _os_error_in_chain(e: BaseException | None) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


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
        if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and p.is_file()
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

    Raises:
        CheckpointWriteError: The file cannot be written (disk full, no permission...); the
            checkpoint previously at ``path``, if any, is untouched.
    """
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        kept = f"; the previous {path.name} is untouched" if path.exists() else ""
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {describe_os_error(e)}{kept}"
        ) from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    Only tensors and plain data are accepted (``torch.load(weights_only=True)``): a file that
    would unpickle arbitrary objects is refused without running them.

    Raises:
        CheckpointError: The file is missing, truncated, corrupt or holds unsafe objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
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

    Files are named ``epoch=EEEE-<metric>=S.SSS.ckpt`` inside ``directory``; the set is
    rebuilt from the file names, so it survives a resume.
    """

    def __init__(self, directory: str | Path, k: int, metric: str = "test_mean_score") -> None:
        self.directory = Path(directory)
        self.k = k
        self.metric = metric
        self._pattern = re.compile(rf"epoch=(\d+)-{re.escape(metric)}=(-?[\d.]+)\.ckpt$")

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
        path = self.directory / f"epoch={epoch:04d}-{self.metric}={score:.3f}.ckpt"
        save_checkpoint(path, state)
        for _, old in [sp for sp in kept if sp[1] != path][self.k - 1 :]:
            old.unlink(missing_ok=True)
        return path
