"""Faults during training: NaN/inf steps, failed and killed checkpoint writes, crashing envs."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from diffusion_policy.envs.pusht_env import make_pusht_env
from diffusion_policy.envs.runner import EnvRunner
from diffusion_policy.training import checkpoint as checkpoint_module
from diffusion_policy.training.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    save_checkpoint,
)
from diffusion_policy.training.logger import read_jsonl
from diffusion_policy.training.trainer import NonFiniteLossError, Trainer
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]


def _cfg(zarr: Path, *overrides: str):
    """A `+debug=fast` run: 3 steps per epoch, a checkpoint per epoch, no rollouts."""
    return debug_cfg(zarr, "trainer.rollout_every=0", *overrides)


def _latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.ckpt"


def _poison(trainer: Trainer, bad_calls: set[int] | None = None, from_call: int | None = None):
    """Makes ``compute_loss`` return NaN on the given calls (1-based); records the weights."""
    real = trainer.policy.compute_loss
    calls = itertools.count(1)
    weights: dict[int, torch.Tensor] = {}

    def compute_loss(batch):
        i = next(calls)
        weights[i] = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
        loss = real(batch)
        bad = i in (bad_calls or set()) or (from_call is not None and i >= from_call)
        return loss * float("nan") if bad else loss

    trainer.policy.compute_loss = compute_loss
    return weights


# -- non-finite loss and gradients ---------------------------------------------------------------
def test_nonfinite_loss_step_is_skipped_with_a_warning(pusht_zarr_path, tmp_path, caplog):
    trainer = Trainer(_cfg(pusht_zarr_path), tmp_path / "run")
    weights = _poison(trainer, bad_calls={2, 5})
    with caplog.at_level(logging.WARNING):
        metrics = trainer.train()
    assert trainer.global_step == 4  # 6 batches, 2 skipped
    torch.testing.assert_close(weights[2], weights[3])  # the skipped step changed nothing
    assert not torch.equal(weights[3], weights[4])  # (step 1 has lr 0: warmup)
    assert metrics["train/skipped_steps"] == 1 and torch.isfinite(weights[6]).all()
    assert "skipped a training step after step 1: loss=nan" in caplog.text
    records = read_jsonl(tmp_path / "run" / "logs.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]


def test_nonfinite_gradient_is_skipped(pusht_zarr_path, tmp_path, caplog):
    trainer = Trainer(_cfg(pusht_zarr_path, "trainer.num_epochs=1"), tmp_path / "run")
    calls = itertools.count(1)
    param = next(trainer.policy.parameters())
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if next(calls) == 2 else g)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.global_step == 2
    assert "gradient norm=inf" in caplog.text or "gradient norm=nan" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_too_many_nonfinite_steps_stop_and_keep_the_checkpoint(pusht_zarr_path, run_copy, caplog):
    latest = _latest(run_copy)
    before = latest.read_bytes()
    cfg = _cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=3")
    cfg.trainer.max_nonfinite_steps = 2
    trainer = Trainer(cfg, run_copy)
    _poison(trainer, from_call=2)  # step 4 trains, then every loss is NaN
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    msg = str(err.value)
    assert "2 training steps in a row had a non-finite loss or gradient" in msg
    assert "after step 4" in msg and "trainer.max_nonfinite_steps=2" in msg
    assert f"{latest} is intact" in msg and "resume=true" in msg
    assert latest.read_bytes() == before  # epoch 2 never finished: no checkpoint was written
    assert load_checkpoint(latest)["global_step"] == 3
    # After "fixing the cause", the run resumes from that checkpoint.
    resumed = Trainer(_cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=2"), run_copy)
    assert resumed.global_step == 3
    resumed.train()
    assert load_checkpoint(latest)["global_step"] == 6


def test_config_values_are_checked():
    from diffusion_policy.training.config_checks import check_config

    trainer = {"num_epochs": 1, "batch_size": 2, "num_workers": 0, "log_every": 1, "topk": 0}
    trainer |= {"max_nonfinite_steps": 3, "grad_clip_norm": None, "precision": "auto"}
    ok = {"seed": 0, "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "trainer": trainer}
    check_config(ok)
    with pytest.raises(ValueError, match=r"trainer.max_nonfinite_steps=0 must be an integer >= 1"):
        check_config(ok | {"trainer": trainer | {"max_nonfinite_steps": 0}})
    with pytest.raises(ValueError, match=r"trainer.grad_clip_norm=-1.0 must be a finite number"):
        check_config(ok | {"trainer": trainer | {"grad_clip_norm": -1.0}})
    with pytest.raises(ValueError, match=r"^horizon='16' must be an integer >= 1$"):
        check_config(ok | {"horizon": "16"})


# -- checkpoint writes that fail -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "advice"),
    [(errno.ENOSPC, "free disk space"), (errno.EACCES, "make the folder writable")],
)
def test_failed_checkpoint_write_is_clear_and_keeps_the_previous(
    pusht_zarr_path, run_copy, monkeypatch, code, advice
):
    latest = _latest(run_copy)
    trainer = Trainer(_cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=2"), run_copy)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError) as err:
        trainer.train()
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    msg = str(err.value)
    assert f"cannot write checkpoint {latest}: [{errno.errorcode[code]}]" in msg
    assert advice in msg and "the previous latest.ckpt is untouched" in msg
    assert "Training stopped at epoch 2, step 6" in msg
    assert f"continue from {latest} with resume=true hydra.run.dir={run_copy}" in msg
    assert load_checkpoint(latest)["global_step"] == 3
    assert [p.name for p in latest.parent.iterdir()] == ["latest.ckpt"]  # no temp file left


def test_real_file_size_limit_is_reported_and_keeps_the_previous(tmp_path):
    """A real OS write error (EFBIG from `ulimit -f`, like ENOSPC) in a child process."""
    path = tmp_path / "latest.ckpt"
    save_checkpoint(path, {"w": torch.ones(10)})
    code = (
        "import sys, torch\n"
        "from diffusion_policy.training.checkpoint import save_checkpoint\n"
        "save_checkpoint(sys.argv[1], {'w': torch.zeros(1_000_000)})\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard)),
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "CheckpointWriteError: cannot write checkpoint" in last and "[EFBIG]" in last
    assert "the previous latest.ckpt is untouched" in last
    torch.testing.assert_close(load_checkpoint(path)["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]


def test_unwritable_run_folder_fails_before_loading_data(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file in the way")
    cfg = _cfg(tmp_path / "no_such.zarr")
    with pytest.raises(CheckpointWriteError, match=r"to .*checkpoints: \[EEXIST\].*file is in"):
        Trainer(cfg, tmp_path / "run")


_KILLED_SAVE = """
import sys, time, torch
from hydra import compose, initialize_config_dir
from diffusion_policy.training.trainer import Trainer

real_save, saves = torch.save, []

class Crawl:  # a very slow disk
    def __init__(self, f):
        self.f = f

    def write(self, data):
        time.sleep(0.05)
        return self.f.write(data)

    def flush(self):
        pass

def save(obj, f, *args, **kwargs):
    saves.append(1)
    real_save(obj, Crawl(f) if len(saves) == 2 else f, *args, **kwargs)

torch.save = save
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose(config_name="train", overrides=sys.argv[3:])
Trainer(cfg, sys.argv[2]).train()
"""


def test_kill_during_checkpoint_save_keeps_the_previous_and_resumes(pusht_zarr_path, tmp_path):
    """SIGKILL while the epoch-2 checkpoint is half written: epoch 1's loads and resumes."""
    run = tmp_path / "run"
    overrides = [
        "+experiment=pusht_lowdim",
        "+debug=fast",
        f"dataset.zarr_path={pusht_zarr_path}",
        "logger.mode=disabled",
        "trainer.rollout_every=0",
        "trainer.num_epochs=2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(REPO / "configs"), str(run), *overrides],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 240
    partial_file = None
    while partial_file is None and time.monotonic() < deadline and proc.poll() is None:
        if (ckpts / "latest.ckpt").exists():
            tmps = [p for p in ckpts.glob(".latest.ckpt.*.tmp") if p.stat().st_size > 0]
            partial_file = tmps[0] if tmps else None
        time.sleep(0.01)
    if partial_file is None:
        proc.kill()
        pytest.fail(f"the child never started its second save: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert partial_file.exists()  # killed mid-write: the partial file is left behind...

    state = load_checkpoint(ckpts / "latest.ckpt")  # ...and the previous checkpoint loads
    assert (state["epoch"], state["global_step"]) == (1, 3)
    trainer = Trainer(_cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=2"), run)
    assert not partial_file.exists()  # the resumed run cleans it up
    assert (trainer.epoch, trainer.global_step) == (1, 3)
    trainer.train()
    assert load_checkpoint(ckpts / "latest.ckpt")["global_step"] == 6
    steps = [r["step"] for r in read_jsonl(run / "logs.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's steps 4-6 are not doubled


# -- rollouts whose env crashes ------------------------------------------------------------------
class _CrashingPushT:
    """Builds Push-T envs whose episode of ``bad_seed`` kills its process at step 3."""

    def __init__(self, bad_seed: int):
        self.bad_seed = bad_seed

    def __call__(self):
        import gymnasium as gym

        bad_seed = self.bad_seed

        class Crash(gym.Wrapper):
            def reset(self, *, seed=None, options=None):
                self.episode_seed, self.t = seed, 0
                return self.env.reset(seed=seed, options=options)

            def step(self, action):
                self.t += 1
                if self.episode_seed == bad_seed and self.t == 3:
                    os._exit(1)
                return self.env.step(action)

        return Crash(make_pusht_env())


def test_crashing_async_env_does_not_take_training_down(pusht_zarr_path, tmp_path):
    """The original implementation's async runner took training down with an EOFError."""
    run = tmp_path / "run"
    cfg = _cfg(pusht_zarr_path, "trainer.num_epochs=1", "trainer.rollout_every=1")
    trainer = Trainer(cfg, run)
    trainer.env_runner = EnvRunner(
        partial(_CrashingPushT(100001)),
        n_test=2,
        n_train=0,
        max_steps=16,
        vectorization="async",
        progress=False,
    )
    metrics = trainer.train()
    assert metrics["test/n_failed"] == 1
    assert 0.0 <= metrics["test/mean_score"] <= 0.5
    assert load_checkpoint(_latest(run))["metrics"]["test/n_failed"] == 1.0
    assert any(r.get("test/n_failed") == 1 for r in read_jsonl(run / "logs.jsonl"))
