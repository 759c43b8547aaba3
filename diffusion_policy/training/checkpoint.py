"""Checkpoints: tensors and plain data, written atomically, loaded without unpickling objects."""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


def atomic_write(path: str | Path, write: Any) -> None:
    """Writes a file through a temporary sibling, fsync and rename: it is complete or absent.

    Args:
        path: Destination.
        write: Callable taking an open binary file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Saves a dict of tensors, state dicts and plain Python data atomically."""
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


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


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
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
