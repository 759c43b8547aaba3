"""Run logging: Weights & Biases (offline by default) and a JSONL file in the run folder.

The JSONL file is append-only: one ``write`` per record, each a whole line. It is synced to disk
at every checkpoint (:meth:`RunLogger.sync`). A crash can leave a partial last line (power loss,
full disk): :func:`read_jsonl` skips it, and a resumed run first cuts the file back to the
records up to the checkpoint it resumes from, so no step appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

from diffusion_policy.training.checkpoint import describe_os_error
from diffusion_policy.utils.atomic import FILE_MODE, atomic_write
from diffusion_policy.utils.jsonl import read_jsonl

__all__ = ["WANDB_MODES", "RunLogger", "read_jsonl"]  # read_jsonl is re-exported

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


class RunLogger:
    """Sends scalar metrics to W&B and appends them as JSON lines to ``<run_dir>/logs.jsonl``.

    Args:
        run_dir: The run folder (holds the JSONL file and W&B's files).
        config: Resolved run configuration, recorded by W&B.
        mode: ``"offline"`` (default, no account needed), ``"online"`` or ``"disabled"``.
        project: W&B project.
        group: W&B group; runs of one sweep share it.
        name: W&B run name.
        tags: W&B tags.
        resume: Continue the W&B run whose id is stored in the run folder.
        resume_step: When resuming, drop the JSONL records after this step (they were logged
            after the checkpoint the run resumes from, and are logged again).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any] | None = None,
        mode: str = "offline",
        project: str = "diffusion_policy",
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        resume: bool = False,
        resume_step: int | None = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} must be one of {WANDB_MODES}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "logs.jsonl"
        if resume_step is not None and self.jsonl_path.exists():
            _truncate_after(self.jsonl_path, resume_step)
        # Raw appends: each record is one write(2) of a whole line, nothing waits in a buffer.
        # FILE_MODE (masked by the umask) as open() would: without it os.open uses 0o777.
        self._fd: int | None = os.open(
            self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE
        )
        self._torn = _ends_mid_line(self.jsonl_path)  # a crash left a partial last line
        self._write_failed = False
        self._wandb = None
        if mode == "disabled":
            return

        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        run_id = run_id or uuid.uuid4().hex[:8]
        atomic_write(id_file, lambda f: f.write(run_id.encode()))
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb.init(
            project=project,
            group=group,
            name=name,
            tags=list(tags or []),
            config=config,
            dir=str(self.run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )
        log.info("W&B run %s (%s): %s", run_id, mode, self._wandb.dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Logs scalar metrics (and W&B media objects, which skip the JSONL file) at a step."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        record = {
            "step": step,
            **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()},
        }
        self._append(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_video(self, key: str, path: str | Path, step: int) -> None:
        """Logs an MP4 file as a W&B video."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Video(str(path), format="mp4")}, step=step)

    def _append(self, line: str) -> None:
        """Appends one line; a failed write (e.g. a full disk) warns once and does not raise."""
        if self._fd is None:
            return
        data = line.encode()
        if self._torn:  # End the partial line first, so this record stays readable.
            data = b"\n" + data
        try:
            written = os.write(self._fd, data)
        except OSError as e:
            if not self._write_failed:
                log.warning("cannot append to %s: %s", self.jsonl_path, describe_os_error(e))
            self._write_failed = True
            return
        self._torn = written < len(data)
        self._write_failed = False

    def sync(self) -> None:
        """Forces the JSONL records written so far to disk (the trainer calls it per checkpoint)."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as e:
            log.warning("cannot sync %s: %s", self.jsonl_path, describe_os_error(e))

    def finish(self) -> None:
        """Syncs and closes the JSONL file, and finishes the W&B run."""
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _ends_mid_line(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) != b"\n"


def _truncate_after(path: Path, step: int) -> None:
    """Rewrites ``path`` (atomically) without the records after ``step`` and partial lines."""
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            dropped += 1
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] > step
        ):
            dropped += 1
            continue
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    if dropped:
        atomic_write(path, lambda f: f.writelines(kept))
        log.info(
            "%s: dropped %d records after step %d, the resumed checkpoint", path, dropped, step
        )
