"""Same seed, same losses (CPU); a run killed and resumed logs what an uninterrupted one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from diffusion_policy.training.checkpoint import load_checkpoint
from diffusion_policy.training.trainer import Trainer
from diffusion_policy.utils.jsonl import read_jsonl
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]
FAST = [
    "+experiment=pusht_lowdim",
    "+debug=fast",
    "logger.mode=disabled",
    "trainer.rollout_every=0",
]


def _cfg(zarr: Path, *overrides: str):
    return debug_cfg(zarr, "trainer.rollout_every=0", *overrides)


def _without_clock(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train/minutes"} for r in records]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["train/loss"]) for r in read_jsonl(run / "logs.jsonl") if "train/loss" in r
    ]


def test_same_seed_same_losses(pusht_zarr_path, tmp_path):
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        Trainer(_cfg(pusht_zarr_path, f"seed={seed}"), tmp_path / name).train()
    a, b, c = (_losses(tmp_path / name) for name in "abc")
    assert len(a) == 6
    assert a == b  # exactly: same batches, noise and timesteps
    assert [loss for _, loss in a] != [loss for _, loss in c]


# 3 epochs of 40 steps, a checkpoint after each.
STEPS_PER_EPOCH = 40
KILL_RUN = [*FAST, "trainer.num_epochs=3", f"trainer.max_train_steps_per_epoch={STEPS_PER_EPOCH}"]


def _train_cli(zarr: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *KILL_RUN, f"dataset.zarr_path={zarr}",
            f"hydra.run.dir={run}", *overrides]  # fmt: skip


def _last_step(log: Path) -> int:
    if not log.exists():
        return 0
    # The run is still writing: read_jsonl skips a partial last line.
    return max([0, *(r["step"] for r in read_jsonl(log) if "step" in r)])


def test_sigkill_then_resume_logs_the_same_losses(pusht_zarr_path, tmp_path):
    # Single-threaded subprocesses: the same arithmetic in every run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    # The uninterrupted run, alongside the one to kill.
    ref_err = tmp_path / "uninterrupted.err"
    with open(ref_err, "wb") as err:
        uninterrupted = subprocess.Popen(_train_cli(pusht_zarr_path, ref), cwd=REPO, env=env,
                                         stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip

    # Kill -9 the run mid-epoch 2, some steps after its first checkpoint.
    latest, log = run / "checkpoints" / "latest.ckpt", run / "logs.jsonl"
    with open(tmp_path / "killed.err", "wb") as err:
        proc = subprocess.Popen(_train_cli(pusht_zarr_path, run), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if latest.exists() and _last_step(log) > STEPS_PER_EPOCH + 5:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resume_step = load_checkpoint(latest)["global_step"]
    # Steps after the checkpoint were logged (almost always): the resumed run drops them.
    assert resume_step % STEPS_PER_EPOCH == 0 and _last_step(log) >= resume_step

    subprocess.run(_train_cli(pusht_zarr_path, run, "resume=true"), cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    assert uninterrupted.wait(timeout=300) == 0, ref_err.read_text()[-3000:]
    # Every record, losses and learning rates after the resume point included, is the
    # uninterrupted run's, once; the wall-clock training minutes alone differ.
    assert _without_clock(read_jsonl(log)) == _without_clock(read_jsonl(ref / "logs.jsonl"))
    assert [s for s, _ in _losses(run)] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
