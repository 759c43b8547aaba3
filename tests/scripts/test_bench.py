"""`scripts/bench.py --quick` runs every part and reports positive figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DDIMScheduler

from diffusion_policy.deploy.warmup import example_obs
from tests.deploy.fakes import tiny_policy
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_quick_reports_every_figure(pusht_zarr_path, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PUSHT_ZARR": str(pusht_zarr_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/bench.py", "--quick", "--repeats", "1", "--episodes", "2"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["machine"]["peak_fp32_gflops"] > 0
    for kind in ("keypoint", "image"):
        step = figures[kind]["step"]
        assert 0 < step["s"]["min"] <= step["s"]["median"]
        assert step["gflop"] > 0 and step["gflops"] > 0
        assert figures[kind]["loader_samples_per_s"] > 0
        assert set(figures[kind]["latency"]) == {
            "ddpm_10",
            "ddim_10",
            "dpmsolver_4",
            "dpmsolver_4_compiled",
        }
    for rollout in (figures["keypoint"]["rollout"], figures["blockpush"]):
        assert rollout["episodes"] == 2 and rollout["s"] > 0 and rollout["env_steps_per_s"] > 0
    assert 0 < figures["image"]["peak_rss_gib"] < 24
    recipe = figures["cpu_recipe"]["latency"]
    assert len(recipe) == 3 and all(s["min"] > 0 for s in recipe.values())
    assert any(setting.endswith("_compiled") for setting in recipe)
    assert any("_onnx_" in setting for setting in recipe)
    reference = figures["reference"]
    assert set(reference) == {
        "train_step",
        "predict_ddim_16",
        "predict_ddim_16_onnx",
        "predict_ddim_16_onnx_int8",
        "recipe_predict",
    }
    assert all(row["ratio"] > 0 for row in reference.values())
    assert "| keypoint train step, batch 32" in proc.stdout


def test_a_benched_graph_opens_sessions_of_other_thread_counts_later():
    """`choose_inference_threads` times a graph at other thread counts after its export."""
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    graph = load_script("bench").onnx_graph(policy, threads=1)
    graph.set_num_threads(2)  # reads the file again
    assert graph.predict_action(example_obs(graph))["action"].shape == (
        1,
        policy.n_action_steps,
        policy.action_dim,
    )
