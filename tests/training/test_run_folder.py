"""The run folder and faults during training: locks, refused starts and resumes, signals,
failing rollouts, non-finite weights."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_policy.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_policy.training.config_checks import ConfigError
from diffusion_policy.training.interrupt import TrainingInterrupted
from diffusion_policy.training.logger import read_jsonl
from diffusion_policy.training.run_dir import RunFolderError, RunFolderLock, split_frozen
from diffusion_policy.training.trainer import NonFiniteWeightsError, Trainer
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]


def _cfg(zarr: Path, *overrides: str):
    """A `+debug=fast` run of 2 steps per epoch, a checkpoint per epoch, no rollouts."""
    return debug_cfg(
        zarr, "trainer.rollout_every=0", "trainer.max_train_steps_per_epoch=2", *overrides
    )


def _latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.ckpt"


# -- one process per run folder ------------------------------------------------------------------
def test_a_locked_run_folder_is_refused_naming_the_holder(pusht_zarr_path, run_copy):
    holder = RunFolderLock(run_copy)
    holder.acquire()
    try:
        with pytest.raises(RunFolderError, match=rf"in use by pid {os.getpid()} on host"):
            Trainer(_cfg(pusht_zarr_path, "resume=true"), run_copy)
    finally:
        holder.release()
    trainer = Trainer(_cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=1"), run_copy)
    with pytest.raises(RunFolderError, match="in use"):  # the trainer holds it now
        RunFolderLock(run_copy).acquire()
    trainer.train()  # nothing left to train; releases the folder
    RunFolderLock(run_copy).acquire()


# -- new runs and resumes that would destroy a run -----------------------------------------------
def test_new_run_into_a_folder_with_checkpoints_is_refused(pusht_zarr_path, run_copy):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError) as err:
        Trainer(_cfg(pusht_zarr_path), run_copy)
    msg = str(err.value)
    assert "already holds a run (checkpoints/latest.ckpt, logs.jsonl)" in msg
    assert f"resume=true hydra.run.dir={run_copy}" in msg and "another folder" in msg
    after = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: b for p, b in before.items() if p.name != ".lock"}


def test_resume_without_latest_is_refused_and_keeps_the_top_k(pusht_zarr_path, run_copy, tmp_path):
    top = run_copy / "checkpoints" / "epoch=0000-test_mean_score=0.500.ckpt"
    _latest(run_copy).rename(top)
    with pytest.raises(RunFolderError) as err:
        Trainer(_cfg(pusht_zarr_path, "resume=true"), run_copy)
    msg = str(err.value)
    assert f"no {_latest(run_copy)} to resume from" in msg and top.name in msg
    assert top.exists()
    with pytest.raises(RunFolderError, match="the folder is empty or new"):
        Trainer(_cfg(pusht_zarr_path, "resume=true"), tmp_path / "nothing")


def test_resume_refuses_shape_changes_and_keeps_config_yaml(pusht_zarr_path, run_copy):
    config = run_copy / "config.yaml"
    before = config.read_bytes()
    cfg = _cfg(
        pusht_zarr_path, "resume=true", "horizon=12", "noise_scheduler.num_train_timesteps=20"
    )
    with pytest.raises(RunFolderError) as err:
        Trainer(cfg, run_copy)
    msg = str(err.value)
    assert "horizon: 16 -> 12" in msg and "noise_scheduler.num_train_timesteps: 10 -> 20" in msg
    assert config.read_bytes() == before


def test_resume_applies_and_records_other_changes(pusht_zarr_path, run_copy, caplog):
    cfg = _cfg(pusht_zarr_path, "resume=true", "optimizer.lr=0.001", "trainer.num_epochs=2")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, run_copy)
    trainer.close()
    assert "optimizer.lr: 0.0001 -> 0.001" in caplog.text
    assert "trainer.num_epochs: 1 -> 2" in caplog.text
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [0.001]
    assert trainer.lr_scheduler.base_lrs == [0.001]
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["optimizer"]["lr"] == 0.001
    (record,) = read_jsonl(run_copy / "config_changes.jsonl")
    assert record["step"] == 2 and record["changes"]["optimizer.lr"] == {"old": 1e-4, "new": 1e-3}


# -- signals -------------------------------------------------------------------------------------
def test_sigint_finishes_the_step_saves_and_resumes(pusht_zarr_path, tmp_path):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    trainer = Trainer(_cfg(pusht_zarr_path, "trainer.num_epochs=2"), run)
    real, calls = trainer.policy.compute_loss, itertools.count(1)

    def compute_loss(batch):
        if next(calls) == 3:  # the first step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(batch)

    trainer.policy.compute_loss = compute_loss
    with pytest.raises(TrainingInterrupted) as err:
        trainer.train()
    assert err.value.exit_code == 130
    assert str(err.value).startswith("interrupted at epoch 2 step 3;")
    assert f"resume with resume=true hydra.run.dir={run}" in str(err.value)
    state = load_checkpoint(_latest(run))
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (1, 1, 3)
    assert signal.getsignal(signal.SIGINT) is before  # restored

    resumed = Trainer(_cfg(pusht_zarr_path, "trainer.num_epochs=2", "resume=true"), run)
    resumed.train()  # the rest of epoch 2: one step
    assert load_checkpoint(_latest(run))["global_step"] == 4
    assert [r["step"] for r in read_jsonl(run / "logs.jsonl") if "train/loss" in r] == [1, 2, 3, 4]


def test_sigterm_on_the_command_line_saves_and_exits_143(pusht_zarr_path, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "train.py", "+experiment=pusht_lowdim", "+debug=fast",
               f"dataset.zarr_path={pusht_zarr_path}", "logger.mode=disabled",
               "trainer.rollout_every=0", "trainer.num_epochs=1000",
               f"hydra.run.dir={run}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "logs.jsonl").exists() and (run / "logs.jsonl").stat().st_size > 0:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=120)
    stderr = stderr.decode()
    assert proc.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at epoch ") and "latest.ckpt saved" in last
    assert "resume with python train.py +experiment=pusht_lowdim" in last
    assert f"resume=true hydra.run.dir={run}" in last and "Traceback" not in stderr
    assert load_checkpoint(_latest(run))["global_step"] >= 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["latest.ckpt"]


# -- rollouts ------------------------------------------------------------------------------------
class _FailingRunner:
    def __init__(self, error: BaseException):
        self.error = error

    def run(self, policy):
        raise self.error


@pytest.mark.parametrize(
    "error", [SystemExit(3), OSError(errno.ENOSPC, "No space left on device")], ids=str
)
def test_a_failing_rollout_does_not_stop_training(pusht_zarr_path, tmp_path, caplog, error):
    cfg = _cfg(pusht_zarr_path, "trainer.num_epochs=2", "trainer.rollout_every=1")
    cfg.trainer.max_train_steps_per_epoch = 1
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.env_runner = _FailingRunner(error)
    with caplog.at_level(logging.ERROR):
        metrics = trainer.train()
    assert metrics["epoch"] == 1 and "test/mean_score" not in metrics
    assert f"rollout of epoch 2 failed ({type(error).__name__}" in caplog.text
    assert load_checkpoint(_latest(tmp_path / "run"))["global_step"] == 2


def test_ctrl_c_during_a_rollout_saves_the_epoch(pusht_zarr_path, tmp_path):
    cfg = _cfg(pusht_zarr_path, "trainer.num_epochs=2", "trainer.rollout_every=1")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.env_runner = _FailingRunner(KeyboardInterrupt())
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 1 step 2") as err:
        trainer.train()
    assert err.value.exit_code == 130
    assert load_checkpoint(_latest(tmp_path / "run"))["epoch"] == 1


# -- non-finite weights --------------------------------------------------------------------------
def test_nonfinite_weights_are_never_checkpointed(pusht_zarr_path, run_copy):
    latest = _latest(run_copy)
    before = latest.read_bytes()
    trainer = Trainer(_cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=2"), run_copy)
    name, param = next(iter(trainer.policy.named_parameters()))
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):  # an absurd update: finite loss, inf weights
        real_step(*args, **kwargs)
        with torch.no_grad():
            param.fill_(float("inf"))

    trainer.optimizer.step = step
    with pytest.raises(NonFiniteWeightsError) as err:
        trainer.train()
    msg = str(err.value)
    assert f"model.{name}" in msg and "NaN or inf" in msg
    assert f"{latest} (epoch 1) is the last good checkpoint" in msg and "resume=true" in msg
    assert latest.read_bytes() == before


# -- clear errors --------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error_before_data_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"device=cuda but torch.cuda.is_available\(\) is False"):
        Trainer(_cfg(tmp_path / "no_such.zarr", "device=cuda"), tmp_path / "run")


def test_zero_train_timesteps_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path / "no_such.zarr", "noise_scheduler.num_train_timesteps=0")
    with pytest.raises(ConfigError, match=r"noise_scheduler.num_train_timesteps=0 must be"):
        Trainer(cfg, tmp_path / "run")


def test_resume_from_a_checkpoint_without_model_names_the_key(pusht_zarr_path, run_copy):
    state = load_checkpoint(_latest(run_copy))
    del state["model"], state["format_version"]
    save_checkpoint(_latest(run_copy), state)
    with pytest.raises(CheckpointError, match=r"has no 'model' entry"):
        Trainer(_cfg(pusht_zarr_path, "resume=true"), run_copy)


def test_a_moved_dataset_may_resume_but_other_data_settings_may_not():
    changes = {
        "dataset.zarr_path": ("/old/pusht.zarr", "/new/pusht.zarr"),
        "dataset.val_ratio": (0.02, 0.1),
        "optimizer.lr": (1e-4, 1e-3),
    }
    frozen, applied = split_frozen(changes)
    assert list(frozen) == ["dataset.val_ratio"]
    assert sorted(applied) == ["dataset.zarr_path", "optimizer.lr"]
