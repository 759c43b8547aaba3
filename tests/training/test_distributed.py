"""Data-parallel training on CPU (gloo): 2 processes equal 1 process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffusion_policy.training.checkpoint import load_checkpoint
from diffusion_policy.training.distributed import mean_across_ranks, shutdown
from diffusion_policy.training.logger import read_jsonl
from diffusion_policy.training.trainer import Trainer
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
BATCH = 16  # global


def _cfg(zarr: Path, *overrides: str):
    """A tiny run whose first optimizer step has a non-zero learning rate."""
    return debug_cfg(
        zarr,
        "trainer.rollout_every=0",
        f"trainer.batch_size={BATCH}",
        "lr_scheduler.num_warmup_steps=0",
        *overrides,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step(trainer: Trainer, rank: int, world_size: int) -> dict:
    """One training step through ``trainer.model`` on this rank's part of the global batch.

    The noise and timesteps are those of the global batch, so that every process configuration
    computes the same loss.
    """
    policy = trainer.policy
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(BATCH, policy.horizon, policy.action_dim, generator=g)
    timesteps = torch.randint(0, policy.num_train_timesteps, (BATCH,), generator=g)
    trainer.train_sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    mine = slice(rank, None, world_size)  # rank r holds the global batch's r-th interleave

    loss = trainer.model(batch, noise=noise[mine], timesteps=timesteps[mine])
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    trainer.optimizer.step()
    return {
        "batch": batch,
        "loss": mean_across_ranks(loss.detach().reshape(1), trainer.dist).item(),
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in policy.named_parameters()},
    }


def _worker(rank: int, port: int, zarr: Path, run_dir: Path, out_dir: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    try:
        Trainer(_cfg(zarr, "trainer.batch_size=15"), run_dir)
    except ValueError as e:
        bad_batch = str(e)
    trainer = Trainer(_cfg(zarr), run_dir)
    try:
        result = _first_step(trainer, rank, WORLD_SIZE)
        result["bad_batch_error"] = bad_batch
        result["model_type"] = type(trainer.model).__name__
        # A NaN on one rank reaches every rank (so all of them skip that step).
        flag = torch.tensor([float("nan") if rank == 1 else 1.0])
        result["nan_spreads"] = torch.isnan(mean_across_ranks(flag, trainer.dist)).item()
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        shutdown(trainer.dist)


def test_two_processes_equal_one_on_the_global_batch(tiny_pusht_zarr, tmp_path):
    single = Trainer(_cfg(tiny_pusht_zarr), tmp_path / "single")
    expected = _first_step(single, rank=0, world_size=1)

    mp.spawn(
        _worker,
        args=(_free_port(), tiny_pusht_zarr, tmp_path / "ddp", tmp_path),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    for rank, got in enumerate(ranks):
        assert got["model_type"] == "DistributedDataParallel"
        assert "trainer.batch_size=15" in got["bad_batch_error"]
        assert "WORLD_SIZE=2" in got["bad_batch_error"]
        assert got["nan_spreads"]
        # Each rank trains on half the global batch: the single process's batch, interleaved.
        mine = slice(rank, None, WORLD_SIZE)
        torch.testing.assert_close(got["batch"]["action"], expected["batch"]["action"][mine])
        for key, obs in got["batch"]["obs"].items():
            torch.testing.assert_close(obs, expected["batch"]["obs"][key][mine])
        # The same loss and (averaged) gradients as one process on the whole batch.
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        torch.testing.assert_close(got["grads"], expected["grads"], rtol=1e-4, atol=1e-6)
    # The replicas stay identical after the optimizer step.
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)


def _torchrun(run: Path, zarr: Path, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
         f"--master_port={_free_port()}", str(REPO / "train.py"), "+experiment=pusht_lowdim",
         "+debug=fast", "device=cpu", "logger.mode=disabled", "trainer.rollout_every=0",
         f"dataset.zarr_path={zarr}", f"hydra.run.dir={run}", *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_torchrun_trains_logs_once_and_resumes(pusht_zarr_path, tmp_path):
    """`torchrun train.py` with 2 CPU processes: rank 0 alone writes; both resume."""
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    # A global batch of 2048 windows: 4 steps per epoch (10141 windows), whatever the ranks.
    size = ["trainer.batch_size=2048", "trainer.max_train_steps_per_epoch=null"]
    out = _torchrun(run, pusht_zarr_path, cwd, *size, "trainer.num_epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]

    assert list(cwd.iterdir()) == []  # no rank made a run folder of its own
    # .lock: rank 0's run-folder lock.
    names = [".hydra", ".lock", "checkpoints", "config.yaml", "logs.jsonl", "train.log"]
    assert sorted(p.name for p in run.iterdir()) == names
    records = read_jsonl(run / "logs.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]  # once each
    assert [r["epoch"] for r in records if "epoch" in r] == [0]
    state = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    assert (state["epoch"], state["global_step"], len(state["rng_states"])) == (1, 4, 2)

    out = _torchrun(run, pusht_zarr_path, cwd, *size, "trainer.num_epochs=2", "resume=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("resumed from") + out.stderr.count("resumed from") == WORLD_SIZE
    records = read_jsonl(run / "logs.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 9))
    assert load_checkpoint(run / "checkpoints" / "latest.ckpt")["global_step"] == 8
