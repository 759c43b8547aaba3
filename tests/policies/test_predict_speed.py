"""predict_action's set-up hoisted out of the loop changes no sample (schedule snapshot, FiLM)."""

import pytest
import torch

from tests.policies.test_diffusion_policy import make_batch
from tests.policies.test_schedulers import SCHEDULERS, compose_cfg, fitted_policy


def _uncached_predict(policy, obs, seed):
    """predict_action as before the snapshot: ``set_timesteps`` on every call."""
    policy._timesteps_cache = None
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))["action"]


# The multistep solver keeps a history in its state; the others run in the slow set.
@pytest.mark.parametrize(
    "scheduler",
    [s if s == "dpmsolver" else pytest.param(s, marks=pytest.mark.slow) for s in SCHEDULERS],
)
def test_replayed_schedule_samples_what_a_fresh_one_does(scheduler, monkeypatch):
    batch = make_batch(B=1)
    policy = fitted_policy(compose_cfg("unet", scheduler), batch).eval()
    policy.use_sampler_plan = False  # the diffusers loop, whose set-up is snapshotted
    expected = [_uncached_predict(policy, batch["obs"], seed) for seed in range(2)]

    calls = []
    set_timesteps = policy.noise_scheduler.set_timesteps
    monkeypatch.setattr(
        policy.noise_scheduler,
        "set_timesteps",
        lambda *a, **k: calls.append(a) or set_timesteps(*a, **k),
    )
    policy._timesteps_cache = None
    for seed in range(2):  # the multistep solvers' history must not leak between calls
        out = policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out["action"], expected[seed], rtol=0, atol=0)
    assert len(calls) == 1

    policy.set_sampler(policy.noise_scheduler, num_inference_steps=4)  # another schedule
    policy.predict_action(batch["obs"])
    assert len(calls) == 2 and len(policy.noise_scheduler.timesteps) == 4


def test_batched_film_condition_equals_the_per_step_one():
    """Tolerance 1e-6: one batched matrix product instead of one per step (float32 round-off)."""
    batch = make_batch(B=3)
    policy = fitted_policy(compose_cfg("unet", "ddim"), batch).eval()
    policy._set_timesteps(torch.device("cpu"))
    timesteps = policy.noise_scheduler.timesteps
    with torch.no_grad():
        cond = policy.encode_obs(batch["obs"])  # (B, To, F)
        films = policy._film_conditions(timesteps, cond)
        x = torch.randn(3, policy.horizon, policy.action_dim)
        for t, film in zip(timesteps, films, strict=True):
            torch.testing.assert_close(
                film, policy.denoiser.film_condition(t, cond), rtol=1e-6, atol=1e-6
            )
            torch.testing.assert_close(
                policy.denoiser(x, t, cond, film=film),
                policy.denoiser(x, t, cond),
                rtol=1e-5,
                atol=1e-6,
            )


def test_denoiser_without_film_condition_is_called_as_before():
    batch = make_batch(B=2)
    policy = fitted_policy(compose_cfg("transformer", "ddim"), batch).eval()
    assert policy._film_conditions(torch.arange(4), torch.zeros(2, 2, 8)) == [None] * 4
    assert policy.predict_action(batch["obs"])["action"].shape == (2, 8, 2)
