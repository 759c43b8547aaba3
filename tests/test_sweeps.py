"""Hydra multiruns: a seed sweep summarized by scripts/aggregate.py, Optuna, the SLURM launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_policy.utils.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]
FAST = ["+experiment=pusht_lowdim", "+debug=fast", "logger.mode=disabled"]
# configs/hydra/launcher/slurm.yaml with hydra.launcher.partition=gpu, as sbatch options.
SBATCH_OPTIONS = [
    "--partition=gpu",
    "--time=2880",
    "--nodes=1",
    "--ntasks-per-node=1",
    "--gpus-per-node=1",
    "--cpus-per-task=8",
    "--mem=64GB",
    "--job-name=pusht_lowdim",
]


def _multirun(sweep: Path, zarr: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "train.py", "-m", *FAST, f"dataset.zarr_path={zarr}",
         f"hydra.sweep.dir={sweep}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _configs(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in sweep.glob("*/config.yaml")}


@pytest.mark.slow
def test_seed_sweep_then_aggregate(pusht_zarr_path, tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-25" / "10-00-00_pusht_lowdim"
    out = _multirun(sweep, pusht_zarr_path, "seed=1,2", "trainer.rollout_every=1")
    assert out.returncode == 0, out.stderr[-3000:]
    configs = _configs(sweep)
    assert sorted(configs) == ["0_seed=1", "1_seed=2"]
    assert [c["seed"] for _, c in sorted(configs.items())] == [1, 2]
    # The runs of one sweep share a W&B group, named after the sweep folder.
    assert {c["logger"]["group"] for c in configs.values()} == {"2026-11-25_10-00-00_pusht_lowdim"}

    out = subprocess.run(
        [sys.executable, "scripts/aggregate.py", str(sweep)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((sweep / "aggregate.json").read_text())
    assert result["n_runs"] == 2
    assert sorted(r["seed"] for r in result["per_run"]) == [1, 2]
    assert all(r["n_evals"] == 2 for r in result["per_run"])  # epochs 0 and 1
    assert (sweep / "aggregate.png").stat().st_size > 0
    assert "mean ± std (2 seeds)" in out.stdout


@pytest.mark.slow
def test_optuna_search_of_two_trials(pusht_zarr_path, tmp_path):
    sweep = tmp_path / "optuna"
    out = _multirun(sweep, pusht_zarr_path, "+sweep=optuna", "hydra.sweeper.n_trials=2")
    assert out.returncode == 0, out.stderr[-3000:]
    configs = _configs(sweep)
    assert len(configs) == 2
    assert len({c["optimizer"]["lr"] for c in configs.values()}) == 2  # sampled per trial
    assert all(c["trainer"]["batch_size"] in (64, 128, 256) for c in configs.values())
    assert len({c["logger"]["group"] for c in configs.values()}) == 1
    # The objective is each run's best test score; Optuna reports the best trial's.
    best_scores = []
    for trial in configs:
        records = read_jsonl(sweep / trial / "logs.jsonl")
        best_scores.append(max(r.get("test/mean_score", -1.0) for r in records))
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(best_scores)
    assert set(results["best_params"]) == {
        "optimizer.lr", "optimizer.weight_decay", "trainer.batch_size"
    }  # fmt: skip


def test_slurm_launcher_writes_the_sbatch_script(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` composes, and submitit turns it into a valid sbatch script."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")  # submitit checks that it is on a cluster
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                       "+experiment=pusht_lowdim", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    submitted = {}

    def map_array(executor, fn, *job_args):
        submitted["n_jobs"] = len(job_args[0])
        submitted["script"] = executor._executor._make_submission_file_text("python job", "0")
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher.launch([["seed=42"], ["seed=43"]], initial_job_idx=0)
    assert submitted["n_jobs"] == 2
    for option in SBATCH_OPTIONS:
        assert f"#SBATCH {option}\n" in submitted["script"], option
