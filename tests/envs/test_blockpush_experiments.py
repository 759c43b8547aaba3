"""BlockPush experiments compose and instantiate; a tiny training run logs test/p1 and p2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_policy.envs.blockpush_oracle import generate_blockpush
from diffusion_policy.training.builders import build_policy
from diffusion_policy.training.optim import build_optimizer
from diffusion_policy.training.trainer import Trainer
from tests.helpers import CONFIG_DIR, debug_cfg

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("blockpush*.yaml"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("blockpush") / "tiny.zarr"
    generate_blockpush(path, n_episodes=4, seed=0, progress=False)
    return path


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


# (horizon, n_obs_steps, n_action_steps): the paper's DP-C windows, and its DP-T ones for this
# task (a new plan every step).
WINDOWS = {
    "blockpush_lowdim": (16, 2, 8),
    "blockpush_lowdim_cpu": (8, 2, 1),  # short plans, a new one every step
    "blockpush_lowdim_transformer": (5, 3, 1),
}


def test_the_experiments_exist():
    assert sorted(WINDOWS) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, store, tmp_path):
    cfg = _compose([f"+experiment={experiment}", f"dataset.zarr_path={store}"])
    assert cfg.name == experiment
    dataset = instantiate(cfg.dataset)
    policy = build_policy(cfg, dataset.shape_meta)
    horizon, n_obs_steps, n_action_steps = WINDOWS[experiment]
    assert policy.horizon == cfg.horizon == horizon
    assert build_optimizer(cfg.optimizer, policy).param_groups
    runner = instantiate(cfg.env_runner, output_dir=str(tmp_path))
    test_seeds = [s for split, s in runner.seeds if split == "test"]
    assert test_seeds[0] == 100000 and runner.max_steps == 350
    assert (runner.n_obs_steps, runner.n_action_steps) == (n_obs_steps, n_action_steps)
    assert type(runner.scorer).__name__ == "BlockPushScorer"


def test_paper_settings():
    cfg = _compose(["+experiment=blockpush_lowdim"])
    assert list(cfg.denoiser.down_dims) == [256, 512, 1024]
    assert cfg.noise_scheduler.num_train_timesteps == 100
    assert cfg.noise_scheduler._target_ == "diffusers.DDPMScheduler"
    assert (cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps) == (16, 2, 8)
    assert (cfg.dataset.val_ratio, cfg.dataset.seed) == (0.02, 42)
    assert cfg.dataset.zarr_path == "data/blockpush/blockpush_paper_v3.zarr"
    assert cfg.dataset.layout == cfg.env_runner.layout == "paper"
    wide = _compose(["+experiment=blockpush_lowdim", "dataset.layout=wide"])
    assert wide.dataset.zarr_path == "data/blockpush/blockpush_wide_v3.zarr"
    assert wide.env_runner.layout == "wide"
    assert (cfg.env_runner.n_test, cfg.env_runner.n_train) == (50, 6)
    cpu = _compose(["+experiment=blockpush_lowdim_cpu"])
    assert (cpu.trainer.max_minutes, cpu.trainer.batch_size) == (60, 256)
    assert cpu.policy.num_inference_steps == 16
    # The CPU recipe trains on 2,000 demonstrations with detours, generated on first use.
    assert cpu.dataset.zarr_path == "data/blockpush/blockpush_paper_v3_detour03_n2000.zarr"
    assert (cpu.dataset.generate_episodes, cpu.dataset.generate_detour_prob) == (2000, 0.03)
    dpt = _compose(["+experiment=blockpush_lowdim_transformer"])
    assert (dpt.denoiser.n_layer, dpt.denoiser.n_emb, dpt.denoiser.p_drop_attn) == (8, 256, 0.3)
    # The paper's relative moves; the CPU recipe's targets, which its runner follows.
    assert cfg.dataset.abs_action is False and cfg.env_runner.abs_action is False
    assert cpu.dataset.abs_action is True and cpu.env_runner.abs_action is True


def test_runner_envs_take_the_datasets_action_space(store, tmp_path):
    cfg = _compose(["+experiment=blockpush_lowdim_cpu", f"dataset.zarr_path={store}"])
    runner = instantiate(cfg.env_runner, output_dir=str(tmp_path))
    env = runner.env_fn()
    assert env.unwrapped.abs_action and env.unwrapped.layout_name == "paper"
    assert env.action_space.low[0] == 0.15 and env.action_space.high[0] == 0.7
    env.close()
    cfg = _compose(["+experiment=blockpush_lowdim_cpu", "dataset.layout=wide"])
    wide = instantiate(cfg.env_runner, output_dir=str(tmp_path)).env_fn()
    assert wide.unwrapped.layout_name == "wide"
    wide.close()


@pytest.mark.slow  # 9-18 s on 2 shared cores
def test_tiny_training_run_logs_p1_and_p2(store, tmp_path):
    run = tmp_path / "run"
    metrics = Trainer(debug_cfg(store, experiment="blockpush_lowdim"), run).train()
    assert 0.0 <= metrics["test/p1"] <= 1.0 and 0.0 <= metrics["test/p2"] <= 1.0
    logged = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert any("test/p2" in r and "test/mode/b0_first" in r for r in logged)
