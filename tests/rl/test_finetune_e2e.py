"""A tiny fine-tuning run end to end: rollouts, PPO, evaluation, checkpoint, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion_policy.rl.finetuner import FineTuner
from diffusion_policy.training.builders import load_policy
from diffusion_policy.training.checkpoint import load_checkpoint, save_checkpoint
from tests.rl.tiny_policy import SHAPE_META, make_tiny_policy

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs" / "finetune")

STORED_CONFIG = {
    "encoder": {"_target_": "diffusion_policy.encoders.lowdim.LowDimEncoder"},
    "denoiser": {
        "_target_": "diffusion_policy.denoisers.unet.ConditionalUnet1D",
        "_partial_": True,
        "down_dims": [16, 32],
        "step_embed_dim": 16,
    },
    "noise_scheduler": {
        "_target_": "diffusers.DDPMScheduler",
        "num_train_timesteps": 10,
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "prediction_type": "epsilon",
    },
    "horizon": 8,
    "n_obs_steps": 2,
    "n_action_steps": 4,
    "policy": {"num_inference_steps": None},
    "env_runner": {
        "_target_": "diffusion_policy.envs.runner.PushTRunner",
        "obs_type": "keypoint",
        "n_test": 2,
        "n_train": 0,
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "max_steps": 8,
    },
}


@pytest.fixture
def bc_checkpoint(tmp_path) -> Path:
    """A checkpoint of an untrained tiny policy, as train.py stores one."""
    path = tmp_path / "bc.ckpt"
    policy = make_tiny_policy()
    save_checkpoint(
        path, {"model": policy.state_dict(), "config": STORED_CONFIG, "shape_meta": SHAPE_META}
    )
    return path


def _cfg(checkpoint: Path, *overrides: str, experiment: str = "pusht_lowdim_rl"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="finetune",
            overrides=[
                f"+experiment={experiment}",
                f"checkpoint={checkpoint}",
                "device=cpu",
                "logger.mode=disabled",
                "n_iterations=2",
                "eval_every=1",
                "checkpoint_every=1",
                "chain.num_steps=null",
                "chain.ft_denoising_steps=3",
                "rollout.n_envs=2",
                "rollout.max_steps=8",
                "eval.n_test=2",
                "eval.n_envs=2",
                "ppo.epochs=1",
                "ppo.minibatch_size=8",
                "ppo.critic_warmup=0",
                "optimizer.actor_lr=1e-3",
                "critic.hidden_dims=[16]",
                *overrides,
            ],
        )


def test_finetune_writes_a_policy_checkpoint_and_resumes(bc_checkpoint, tmp_path):
    run = tmp_path / "run"
    FineTuner(_cfg(bc_checkpoint), run).run()
    latest = run / "checkpoints" / "latest.ckpt"
    state = load_checkpoint(latest)
    assert state["finetune"]["iteration"] == 2
    # The fine-tuned checkpoint is a policy checkpoint, and its weights moved.
    policy, _ = load_policy(latest)
    initial, _ = load_policy(bc_checkpoint)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(policy.denoiser.parameters(), initial.denoiser.parameters(), strict=True)
    ]
    assert any(moved)
    # It samples with deterministic DDIM on the chain's timesteps (sampler=chain).
    assert type(policy.noise_scheduler).__name__ == "DDIMScheduler"
    assert policy.num_inference_steps == 10 and policy.noise_scheduler.config.clip_sample
    records = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/return" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("ppo/approx_kl", "ppo/clip_frac", "ppo/value_loss", "ppo/log_std"):
        assert key in train[-1]
    evals = [r for r in records if "eval/test/mean_score" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # before training, then every iteration
    best = max(r["eval/test/mean_score"] for r in evals)  # best_metric: test/mean_score
    assert state["finetune"]["best_score"] == pytest.approx(best)

    FineTuner(_cfg(bc_checkpoint, "resume=true", "n_iterations=3"), run).run()
    assert load_checkpoint(latest)["finetune"]["iteration"] == 3
    records = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/return" in r] == [1, 2, 3]


def test_unknown_best_metric_is_named(bc_checkpoint, tmp_path):
    cfg = _cfg(bc_checkpoint, "best_metric=test/nope", "n_iterations=0")
    with pytest.raises(ValueError, match="best_metric='test/nope'.*test/success_rate"):
        FineTuner(cfg, tmp_path / "run").run()


def test_training_seeds_must_not_overlap_test_seeds(bc_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="train_start_seed=99999"):
        FineTuner(_cfg(bc_checkpoint, "rollout.train_start_seed=99999"), tmp_path / "run")


def test_zero_learning_rate_leaves_the_policy_unchanged(bc_checkpoint, tmp_path):
    run = tmp_path / "run"
    FineTuner(
        _cfg(bc_checkpoint, "optimizer.actor_lr=0", "n_iterations=1", "eval_every=0"), run
    ).run()
    tuned = load_checkpoint(run / "checkpoints" / "latest.ckpt")["model"]
    for key, value in load_checkpoint(bc_checkpoint)["model"].items():
        assert torch.equal(tuned[key], value), key


def test_resumed_run_ends_where_an_uninterrupted_one_does(bc_checkpoint, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    FineTuner(_cfg(bc_checkpoint, "eval_every=0"), straight).run()
    FineTuner(_cfg(bc_checkpoint, "eval_every=0", "n_iterations=1"), split).run()
    FineTuner(_cfg(bc_checkpoint, "eval_every=0", "resume=true"), split).run()
    a = load_checkpoint(straight / "checkpoints" / "latest.ckpt")
    b = load_checkpoint(split / "checkpoints" / "latest.ckpt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    for key, value in a["finetune"]["critic"].items():
        torch.testing.assert_close(b["finetune"]["critic"][key], value, rtol=0, atol=0, msg=key)


def test_time_budget_ends_the_run(bc_checkpoint, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(bc_checkpoint, "max_minutes=1e-6", "n_iterations=100", "eval_every=0")
    FineTuner(cfg, run).run()
    # A 60 us budget ends the run at its first check: before or after the first iteration,
    # depending on the machine's load; never at n_iterations.
    assert load_checkpoint(run / "checkpoints" / "latest.ckpt")["finetune"]["iteration"] in (0, 1)


def test_noise_actor_trains_the_noise_policy_only_and_resumes(bc_checkpoint, tmp_path):
    run = tmp_path / "run"
    FineTuner(_cfg(bc_checkpoint, "actor=noise", "eval_every=0"), run).run()
    latest = run / "checkpoints" / "latest.ckpt"
    # The checkpoint loads as a policy with its noise policy (rebuilt from the stored settings).
    policy, cfg = load_policy(latest)
    initial, _ = load_policy(bc_checkpoint)
    assert cfg.policy.noise_policy.hidden_dims == [256, 256]
    assert policy.noise_policy is not None and initial.noise_policy is None
    assert policy.noise_policy.mean_net[-1].weight.abs().sum() > 0  # trained from zero
    for a, b in zip(policy.denoiser.parameters(), initial.denoiser.parameters(), strict=True):
        assert torch.equal(a, b)  # the denoiser is frozen
    FineTuner(
        _cfg(bc_checkpoint, "actor=noise", "eval_every=0", "resume=true", "n_iterations=3"), run
    ).run()
    assert load_checkpoint(latest)["finetune"]["iteration"] == 3


def test_the_steering_recipe_runs(bc_checkpoint, tmp_path):
    run = tmp_path / "run"
    FineTuner(_cfg(bc_checkpoint, "n_iterations=1", experiment="pusht_lowdim_dsrl"), run).run()
    _, cfg = load_policy(run / "checkpoints" / "latest.ckpt")
    assert cfg.policy.noise_policy.init_std == 0.6  # the recipe's starting temperature


def test_unknown_actor_is_named(bc_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="actor='dsrl' must be 'chain' or 'noise'"):
        FineTuner(_cfg(bc_checkpoint, "actor=dsrl"), tmp_path / "run")


def test_std_lr_sets_the_noise_policys_std_learning_rate(bc_checkpoint, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(bc_checkpoint, "actor=noise", "eval_every=0", "optimizer.std_lr=0")
    FineTuner(cfg, run).run()
    model = load_checkpoint(run / "checkpoints" / "latest.ckpt")["model"]
    assert torch.equal(model["noise_policy.log_std"], torch.zeros(8, 2))  # std 1, unmoved
    assert model["noise_policy.mean_net.4.weight"].abs().sum() > 0  # the mean learned (from 0)
