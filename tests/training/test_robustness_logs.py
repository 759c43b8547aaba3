"""The JSONL run log after crashes and on a full disk: readable, never doubled, never fatal."""

from __future__ import annotations

import errno
import logging
import os

from diffusion_policy.training import logger as logger_module
from diffusion_policy.training.logger import RunLogger, read_jsonl


def _log_steps(run_dir, steps, **kwargs) -> RunLogger:
    logger = RunLogger(run_dir, mode="disabled", **kwargs)
    for step in steps:
        logger.log({"train/loss": 1.0 / step}, step=step)
    return logger


def test_partial_last_line_is_skipped_and_repaired_on_resume(tmp_path, caplog):
    _log_steps(tmp_path, [1, 2, 3, 4]).finish()
    path = tmp_path / "logs.jsonl"
    with open(path, "a") as f:  # a crash in the middle of a record (power loss, full disk)
        f.write('{"step": 5, "train/lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    assert "logs.jsonl:5 is not a complete JSON record" in caplog.text

    # Resuming from the checkpoint of step 2 drops what came after it, partial line included.
    _log_steps(tmp_path, [3, 4], resume=True, resume_step=2).finish()
    assert path.read_text().endswith("\n")
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]


def test_append_after_a_partial_line_starts_a_new_line(tmp_path):
    path = tmp_path / "logs.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "trai')
    _log_steps(tmp_path, [7]).finish()
    assert [r["step"] for r in read_jsonl(path)] == [1, 7]


def test_full_disk_warns_once_and_does_not_stop_training(tmp_path, monkeypatch, caplog):
    logger = _log_steps(tmp_path, [1])
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logger_module.os, "write", full)
    with caplog.at_level(logging.WARNING):
        for step in (2, 3, 4):
            logger.log({"train/loss": 0.5}, step=step)
    assert caplog.text.count("[ENOSPC] No space left on device") == 1
    monkeypatch.setattr(logger_module.os, "write", real_write)
    logger.log({"train/loss": 0.5}, step=5)  # space is back: logging goes on
    logger.finish()
    assert [r["step"] for r in read_jsonl(tmp_path / "logs.jsonl")] == [1, 5]


def test_short_write_does_not_glue_records(tmp_path, monkeypatch):
    logger = _log_steps(tmp_path, [1])
    real_write = os.write
    monkeypatch.setattr(logger_module.os, "write", lambda fd, data: real_write(fd, data[:5]))
    logger.log({"train/loss": 0.5}, step=2)  # the disk took only 5 bytes
    monkeypatch.setattr(logger_module.os, "write", real_write)
    logger.log({"train/loss": 0.25}, step=3)
    logger.finish()
    assert [r["step"] for r in read_jsonl(tmp_path / "logs.jsonl")] == [1, 3]


def test_log_files_are_not_executable(tmp_path):
    # Before: os.open without a mode created logs.jsonl 0o777 & ~umask (0o755), unlike the
    # checkpoints (0o600); now every file is 0o666 & ~umask, like open() makes it.
    old = os.umask(0o022)
    try:
        _log_steps(tmp_path, [1]).finish()
        rewritten = tmp_path / "resumed"  # a resume rewrites the log (atomic_write: was 0o600)
        _log_steps(rewritten, [1, 2, 3]).finish()
        _log_steps(rewritten, [3], resume=True, resume_step=2).finish()
    finally:
        os.umask(old)
    assert (tmp_path / "logs.jsonl").stat().st_mode & 0o777 == 0o644
    assert (rewritten / "logs.jsonl").stat().st_mode & 0o777 == 0o644
