"""Every denoiser x noise scheduler config composes, trains a step and samples in range."""

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_policy.training.builders import build_policy
from diffusion_policy.training.optim import build_optimizer
from tests.policies.test_diffusion_policy import SHAPE_META, fit_normalizer, make_batch

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
DENOISERS = sorted(p.stem for p in (CONFIG_DIR / "denoiser").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONFIG_DIR / "noise_scheduler").glob("*.yaml"))

# Tiny sizes per denoiser, so the matrix runs in seconds.
TINY = {
    "unet": ["denoiser.down_dims=[16,32]", "denoiser.step_embed_dim=16"],
    "transformer": ["denoiser.n_layer=1", "denoiser.n_head=2", "denoiser.n_emb=16"],
}


def compose_cfg(denoiser: str, scheduler: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"denoiser={denoiser}",
                f"noise_scheduler={scheduler}",
                "policy.num_inference_steps=8",
                *TINY.get(denoiser, []),
                *overrides,
            ],
        )


def fitted_policy(cfg, batch):
    torch.manual_seed(0)
    policy = build_policy(cfg, SHAPE_META)
    fit_normalizer(policy, batch)
    return policy


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("denoiser", DENOISERS)
def test_denoiser_scheduler_pair_trains_and_samples_in_range(denoiser, scheduler):
    cfg = compose_cfg(denoiser, scheduler)
    assert cfg.noise_scheduler.num_train_timesteps == 100
    assert cfg.noise_scheduler.beta_schedule == "squaredcos_cap_v2"
    assert cfg.noise_scheduler.prediction_type == "epsilon"
    batch = make_batch()
    policy = fitted_policy(cfg, batch)
    optimizer = build_optimizer(cfg.optimizer, policy)

    before = [p.detach().clone() for p in policy.parameters()]
    loss = policy.compute_loss(batch)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters(), strict=True))

    # Sample, train again (the scheduler's inference state must not disturb training), sample.
    policy.eval()
    out = policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(policy.compute_loss(batch))
    out = policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (8, 8, 2) and out["action_pred"].shape == (8, 16, 2)
    assert torch.isfinite(out["action_pred"]).all()
    normalized = policy.normalizer.normalize_key("action", out["action_pred"])
    assert normalized.abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sample_prediction_trains_and_samples(scheduler):
    cfg = compose_cfg("unet", scheduler, "noise_scheduler.prediction_type=sample")
    batch = make_batch()
    policy = fitted_policy(cfg, batch)
    loss = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    out = policy.predict_action(batch["obs"])
    assert policy.normalizer.normalize_key("action", out["action_pred"]).abs().max() <= 1 + 1e-5


def test_training_noise_matches_ddpm_add_noise():
    # The policy noises actions itself (see compute_loss); for DDPM that is add_noise exactly.
    cfg = compose_cfg("unet", "ddpm")
    batch = make_batch()
    policy = fitted_policy(cfg, batch)
    seen = {}

    def record(sample, timestep, cond):
        seen["noisy"], seen["t"] = sample, timestep
        return torch.zeros_like(sample)

    policy.denoiser.forward = record
    torch.manual_seed(3)
    policy.compute_loss(batch)
    torch.manual_seed(3)
    actions = policy.normalizer.normalize_key("action", batch["action"])
    noise = torch.randn_like(actions)
    expected = policy.noise_scheduler.add_noise(actions, noise, seen["t"])
    torch.testing.assert_close(seen["noisy"], expected)


def _eval_script():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "scripts" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_eval_swaps_the_sampler_of_a_trained_policy(scheduler):
    # A policy trained with DDPM on 10 steps, sampled with each scheduler config (eval.py's
    # `noise_scheduler=NAME`): the config's class and options, the trained noise schedule.
    trained = compose_cfg("unet", "ddpm", "noise_scheduler.num_train_timesteps=10")
    batch = make_batch(B=2)
    policy = fitted_policy(trained, batch)
    requested = compose_cfg("unet", scheduler).noise_scheduler
    new = _eval_script().sampling_scheduler(trained.noise_scheduler, requested)
    assert type(new).__name__ == requested._target_.split(".")[-1]
    assert new.config.num_train_timesteps == 10
    policy.set_sampler(new, num_inference_steps=4)
    assert (policy.noise_scheduler, policy.num_inference_steps) == (new, 4)
    out = policy.predict_action(batch["obs"])
    assert policy.normalizer.normalize_key("action", out["action_pred"]).abs().max() <= 1 + 1e-5


def test_sampler_with_another_noise_schedule_is_refused():
    cfg = compose_cfg("unet", "ddpm", "noise_scheduler.num_train_timesteps=10")
    policy = fitted_policy(cfg, make_batch(B=2))
    with pytest.raises(ValueError, match="num_train_timesteps=100.*num_train_timesteps=10"):
        policy.set_sampler(DDIMScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        policy.set_sampler(
            DDIMScheduler(
                num_train_timesteps=10,
                beta_schedule="squaredcos_cap_v2",
                prediction_type="sample",
            )
        )


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 8, 16, 100])
def test_scheduler_config_samples_finite_and_clipped_for_any_step_count(scheduler, steps):
    # A bad model (large random outputs) must still end finite and clipped, including at
    # steps == num_train_timesteps (DPM-Solver's default "linspace" spacing repeats a step there
    # and divides by zero).
    noise_scheduler = instantiate(
        OmegaConf.load(CONFIG_DIR / "noise_scheduler" / f"{scheduler}.yaml")
    )
    noise_scheduler.set_timesteps(steps)
    timesteps = noise_scheduler.timesteps.tolist()
    assert len(set(timesteps)) == len(timesteps) == steps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, 2, generator=g)
    for t in noise_scheduler.timesteps:
        x = noise_scheduler.step(3 * torch.randn(16, 16, 2, generator=g), t, x).prev_sample
    assert torch.isfinite(x).all()
    assert x.abs().max() <= 1.0 + 1e-5
