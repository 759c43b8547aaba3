"""A `+debug=fast` run on the real data: steps, checkpoints, resume, rollouts, evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_policy.training.builders import load_policy
from diffusion_policy.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
)
from diffusion_policy.training.run_dir import RunFolderError
from diffusion_policy.training.trainer import Trainer
from diffusion_policy.utils.jsonl import read_jsonl
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]


def _cfg(zarr: Path, *overrides: str):
    return debug_cfg(zarr, *overrides)


def test_train_checkpoint_resume_rollout(pusht_zarr_path, tmp_path):
    run = tmp_path / "run"
    metrics = Trainer(_cfg(pusht_zarr_path), run).train()
    assert 0.0 <= metrics["test/mean_score"] <= 1.0
    assert 0.0 <= metrics["test/success_rate"] <= 1.0
    latest = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    assert (latest["epoch"], latest["global_step"]) == (2, 6)
    assert len(list((run / "checkpoints").glob("epoch_*-test_mean_score_*.ckpt"))) == 1
    steps = [r["step"] for r in read_jsonl(run / "logs.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]

    # Resume with more epochs: continues at step 7 from the saved optimizer and EMA state.
    trainer = Trainer(_cfg(pusht_zarr_path, "resume=true", "trainer.num_epochs=3"), run)
    assert (trainer.epoch, trainer.global_step, trainer.ema.step) == (2, 6, 6)
    torch.testing.assert_close(trainer.policy.state_dict(), latest["model"])
    trainer.train()
    steps = [r["step"] for r in read_jsonl(run / "logs.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert load_checkpoint(run / "checkpoints" / "latest.ckpt")["global_step"] == 9

    # The saved policy rebuilds from its checkpoint alone (EMA weights) and predicts actions.
    policy, cfg = load_policy(run / "checkpoints" / "latest.ckpt")
    obs = {"keypoint": torch.full((1, 2, 18), 256.0), "agent_pos": torch.full((1, 2), 256.0)}
    obs["agent_pos"] = obs["agent_pos"].unsqueeze(1).expand(1, 2, 2)
    assert policy.predict_action(obs)["action"].shape == (1, 8, 2)


def test_checkpoint_from_other_config_names_mismatch(pusht_zarr_path, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(pusht_zarr_path, "trainer.num_epochs=1", "trainer.rollout_every=0"), run).train()
    with pytest.raises(RunFolderError, match=r"denoiser.down_dims: \[16, 32\] -> \[32, 64\]"):
        Trainer(_cfg(pusht_zarr_path, "resume=true", "denoiser.down_dims=[32,64]"), run)
    state = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build = Trainer(_cfg(pusht_zarr_path, "denoiser.down_dims=[32,64]"), tmp_path / "other")
        load_model_state(build.policy, state["model"], what="latest.ckpt")


def test_cli_train_then_eval(pusht_zarr_path, tmp_path):
    """The README's commands, as a user runs them (W&B offline)."""
    env = {**os.environ, "PUSHT_ZARR": str(pusht_zarr_path), "WANDB_SILENT": "true"}
    run = tmp_path / "cli_run"
    subprocess.run(
        [sys.executable, "train.py", "+experiment=pusht_lowdim", "+debug=fast",
         "trainer.num_epochs=1", "trainer.rollout_every=0", f"hydra.run.dir={run}"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert (run / "config.yaml").exists()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    ckpt = run / "checkpoints" / "latest.ckpt"
    out = subprocess.run(
        [sys.executable, "scripts/eval.py", f"checkpoint={ckpt}", "runner.n_test=2",
         "runner.n_train=0", "runner.max_steps=8", "num_inference_steps=3",
         "runner.n_action_steps=4"],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "test/mean_score" in out.stdout
    report = json.loads((run / "eval" / "latest" / "eval_results.json").read_text())
    assert [e["seed"] for e in report["per_episode"]] == [100000, 100001]
    assert report["num_inference_steps"] == 3 and report["n_action_steps"] == 4
    # As the exported graph with 8-bit weights samples (DDPM draws noise: DDIM for the graph).
    subprocess.run(
        [sys.executable, "scripts/eval.py", f"checkpoint={ckpt}", "runner.n_test=2",
         "runner.n_train=0", "runner.max_steps=8", "noise_scheduler=ddim",
         "num_inference_steps=3", "onnx=int8", f"output_dir={tmp_path / 'int8'}"],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads((tmp_path / "int8" / "eval_results.json").read_text())
    assert report["onnx"] == "int8" and report["noise_scheduler"] == "DDIMScheduler"
    assert [e["seed"] for e in report["per_episode"]] == [100000, 100001]
    assert (tmp_path / "int8" / "policy.onnx").exists()


def test_cli_missing_dataset_is_one_line(tmp_path):
    env = {**os.environ, "PUSHT_ZARR": ""}
    out = subprocess.run(
        [sys.executable, "train.py", "+experiment=pusht_lowdim", "+debug=fast",
         f"dataset.zarr_path={tmp_path}/nope/other.zarr", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nope/other.zarr" in last
    assert "Traceback" not in out.stderr
