"""Run logging: Weights & Biases (offline by default) and a JSONL file in the run folder."""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

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
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} must be one of {WANDB_MODES}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "logs.jsonl"
        self._jsonl = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115 (closed in finish)
        self._wandb = None
        if mode == "disabled":
            return

        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        run_id = run_id or uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
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
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_video(self, key: str, path: str | Path, step: int) -> None:
        """Logs an MP4 file as a W&B video."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Video(str(path), format="mp4")}, step=step)

    def finish(self) -> None:
        """Flushes and closes the JSONL file and the W&B run."""
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
