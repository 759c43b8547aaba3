"""Compiling a policy before serving: example observations and the warmed-up compile."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_policy.deploy.warmup import (
    choose_inference_threads,
    compile_for_inference,
    example_obs,
    fastest_threads,
    set_inference_threads,
    thread_candidates,
)
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


def test_thread_candidates_are_powers_of_two_and_the_most():
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(6) == [1, 2, 4, 6]


def test_fastest_threads_keeps_the_count_that_predicts_fastest():
    cost = {1: 3.0, 2: 1.0, 4: 2.0}  # fake seconds per prediction at each count
    now = [0.0]

    def predict():
        now[0] += cost[torch.get_num_threads()]

    before = torch.get_num_threads()
    try:
        best, medians = fastest_threads(predict, [1, 2, 4], repeats=3, clock=lambda: now[0])
        assert best == 2 and torch.get_num_threads() == 2
        assert medians == cost
    finally:
        torch.set_num_threads(before)


def test_fastest_threads_rejects_bad_candidates():
    with pytest.raises(ValueError, match="thread candidates"):
        fastest_threads(lambda: None, [])
    with pytest.raises(ValueError, match="thread candidates"):
        fastest_threads(lambda: None, [0, 1])


def test_choose_inference_threads_sets_a_candidate_count():
    policy = tiny_policy()
    before = torch.get_num_threads()
    try:
        chosen = choose_inference_threads(policy)
        assert chosen in thread_candidates(before) and torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)


def test_set_inference_threads_takes_a_count_or_auto_and_names_bad_values():
    policy = tiny_policy()
    before = torch.get_num_threads()
    try:
        assert set_inference_threads(policy, 1) == 1 and torch.get_num_threads() == 1
        assert set_inference_threads(policy, "auto") in thread_candidates(1)
        for bad in (0, "four", 2.5, True):
            with pytest.raises(ValueError, match="threads="):
                set_inference_threads(policy, bad)
    finally:
        torch.set_num_threads(before)
