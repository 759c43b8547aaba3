"""Sampler plans: deterministic diffusers samplers as a fixed recurrence, equal to their loops."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)

from diffusion_policy.policies.sampler_plan import plan_sampler
from tests.policies.test_diffusion_policy import make_batch
from tests.policies.test_schedulers import compose_cfg, fitted_policy

COMMON = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"}
DETERMINISTIC = {
    "ddim": lambda **k: DDIMScheduler(
        **COMMON, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing", **k
    ),
    "dpmsolver": lambda **k: DPMSolverMultistepScheduler(
        **COMMON, thresholding=True, sample_max_value=1.0, timestep_spacing="trailing", **k
    ),
    "unipc": lambda **k: UniPCMultistepScheduler(
        **COMMON, thresholding=True, sample_max_value=1.0, timestep_spacing="trailing", **k
    ),
}


def _diffusers_loop(scheduler, steps, noise, model):
    scheduler.set_timesteps(steps)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, i), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_plan_reproduces_the_diffusers_loop(name, prediction):
    scheduler = DETERMINISTIC[name](prediction_type=prediction)
    plan = plan_sampler(scheduler, 8)
    assert plan is not None and len(plan.timesteps) == 8
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 16, 2, generator=gen)
    weights = torch.randn(8, 2, 2, generator=gen)

    def model(x, i):  # a stand-in denoiser that depends on its input, sometimes out of range
        return torch.tanh(x @ weights[i]) * 3

    expected = _diffusers_loop(scheduler, 8, noise, model).clamp(-1, 1)
    torch.testing.assert_close(plan.run(model, noise), expected, atol=1e-4, rtol=1e-4)


def test_clipping_is_part_of_the_plan():
    plan = plan_sampler(DETERMINISTIC["ddim"](), 4)
    assert plan.clip == 1.0
    assert any(any(c != 0.0 for c in row) for row in plan.raw_coefs)  # DDIM's unclipped noise
    dpm = plan_sampler(DETERMINISTIC["dpmsolver"](), 4)
    assert all(c == 0.0 for row in dpm.raw_coefs for c in row)  # the solver steps on x0 only


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(**COMMON),  # draws noise at every step
        DPMSolverMultistepScheduler(**COMMON, thresholding=True, sample_max_value=2.0),  # dynamic
    ],
    ids=["ddpm", "dynamic-thresholding"],
)
def test_no_plan_for_stochastic_or_dynamic_samplers(scheduler):
    assert plan_sampler(scheduler, 8) is None


@pytest.mark.parametrize("scheduler", ["dpmsolver", "ddpm"])
def test_policy_samples_what_the_diffusers_loop_samples(scheduler):
    batch = make_batch(B=2)
    policy = fitted_policy(compose_cfg("unet", scheduler), batch).eval()
    assert (policy.sampler_plan() is not None) == (scheduler != "ddpm")

    def predict():
        return policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(0))

    planned = predict()["action_pred"]
    policy.use_sampler_plan = False
    looped = predict()["action_pred"]
    torch.testing.assert_close(planned, looped, atol=1e-4, rtol=1e-4)  # (B, T, Da) in env units
