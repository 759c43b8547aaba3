"""Compiling a policy before serving: example observations and the warmed-up compile."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_policy.deploy.warmup import compile_for_inference, example_obs
from tests.deploy.fakes import tiny_policy


def test_example_obs_has_the_policys_shapes_and_dtypes():
    policy = tiny_policy()
    obs = example_obs(policy, batch_size=3)
    assert obs.keys() == policy.shape_meta["obs"].keys()
    assert obs["keypoint"].shape == (3, policy.n_obs_steps, 18)
    assert obs["keypoint"].dtype == torch.float32
    assert policy.predict_action(obs)["action"].shape == (3, policy.n_action_steps, 2)


def test_example_obs_images_are_uint8():
    policy = tiny_policy()
    policy.shape_meta = {"obs": {"image": {"shape": [96, 96, 3], "type": "rgb"}}}
    obs = example_obs(policy)
    assert obs["image"].dtype == torch.uint8 and obs["image"].shape == (1, 2, 96, 96, 3)


@pytest.mark.slow
def test_compiled_policy_predicts_what_the_eager_one_does():
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    obs = {"keypoint": torch.rand(1, 2, 18) * 512, "agent_pos": torch.rand(1, 2, 2) * 512}
    eager = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert compile_for_inference(policy) > 0
    assert policy._compiled_sample is not None  # the whole loop: the sampler has a plan
    compiled = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-4)
