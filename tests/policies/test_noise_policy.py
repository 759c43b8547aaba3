"""The learned initial-noise distribution starts as N(0, I) and is stored as data."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from diffusion_policy.policies.noise_policy import NoisePolicy
from tests.rl.tiny_policy import make_tiny_policy

OBS = {"keypoint": torch.rand(5, 2, 18) * 512, "agent_pos": torch.rand(5, 2, 2) * 512}


def _with_noise_policy(**settings):
    policy = make_tiny_policy()
    cond_dim = policy.n_obs_steps * policy.encoder.output_dim
    policy.noise_policy = NoisePolicy.from_config(
        settings, cond_dim, policy.horizon, policy.action_dim
    )
    return policy


def test_an_untrained_noise_policy_samples_what_the_policy_did():
    plain, steered = make_tiny_policy(), _with_noise_policy(hidden_dims=[16])
    for p in (plain, steered):
        p.set_sampler(p.noise_scheduler, 4)
    a = plain.predict_action(OBS, torch.Generator().manual_seed(3))["action_pred"]
    b = steered.predict_action(OBS, torch.Generator().manual_seed(3))["action_pred"]
    assert torch.equal(a, b)


def test_log_prob_is_the_gaussian_density():
    noise_policy = NoisePolicy(8, 4, 2, hidden_dims=[16], init_std=0.7)
    torch.nn.init.normal_(noise_policy.mean_net[-1].weight)  # a mean that is not zero
    cond, w = torch.randn(3, 2, 4), torch.randn(3, 4, 2)
    log_prob, mean, std = noise_policy.log_prob(w, cond)
    assert mean.abs().max() > 0.1 and mean.abs().max() <= noise_policy.max_mean
    expected = Normal(mean, std.expand_as(mean)).log_prob(w).flatten(1).sum(1)
    torch.testing.assert_close(log_prob, expected)
    assert torch.allclose(std, torch.full((4, 2), 0.7))


def test_the_checkpointed_settings_rebuild_it_and_nothing_else():
    policy = _with_noise_policy(hidden_dims=[16, 8], max_mean=2.0)
    settings = policy.noise_policy.config()
    assert settings == {"hidden_dims": [16, 8], "init_std": 1.0, "max_mean": 2.0}
    rebuilt = NoisePolicy.from_config(settings, 40, policy.horizon, policy.action_dim)
    rebuilt.load_state_dict(policy.noise_policy.state_dict())
    with pytest.raises(ValueError, match=r"unknown keys \['_target_'\]"):
        NoisePolicy.from_config({"_target_": "os.system", "hidden_dims": [8]}, 40, 8, 2)
    with pytest.raises(ValueError, match="init_std=0"):
        NoisePolicy(40, 8, 2, init_std=0)
