"""The learned action correction starts at none, corrects only executed rows, is stored as data."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from diffusion_policy.policies.residual_policy import ResidualPolicy
from tests.rl.tiny_policy import make_tiny_policy

OBS = {"keypoint": torch.rand(5, 2, 18) * 512, "agent_pos": torch.rand(5, 2, 2) * 512}


def _residual(policy, **settings) -> ResidualPolicy:
    cond_dim = policy.n_obs_steps * policy.encoder.output_dim
    return ResidualPolicy.from_config(
        settings, cond_dim, policy.horizon, policy.action_dim, 1, policy.n_action_steps
    )


def test_an_untrained_correction_leaves_the_actions_and_a_trained_one_moves_executed_rows():
    plain, corrected = make_tiny_policy(), make_tiny_policy()
    corrected.residual_policy = _residual(corrected, hidden_dims=[16])
    a = plain.predict_action(OBS, torch.Generator().manual_seed(3))["action_pred"]
    b = corrected.predict_action(OBS, torch.Generator().manual_seed(3))["action_pred"]
    assert torch.equal(a, b)
    torch.nn.init.normal_(corrected.residual_policy.mean_net[-1].bias)  # as if trained
    c = corrected.predict_action(OBS, torch.Generator().manual_seed(3))["action_pred"]  # (5, 8, 2)
    rows = slice(1, 1 + corrected.n_action_steps)  # n_obs_steps - 1 .. + Ta
    assert not torch.allclose(c[:, rows], a[:, rows])
    assert torch.equal(c[:, 0], a[:, 0]) and torch.equal(c[:, 5:], a[:, 5:])


def test_log_prob_is_the_gaussian_density_of_the_executed_rows():
    residual = ResidualPolicy(6, 8, 2, 1, 4, hidden_dims=[16], init_std=0.05)
    torch.nn.init.normal_(residual.mean_net[-1].weight)
    cond, x = torch.randn(3, 2, 3), torch.randn(3, 8, 2)
    delta = residual.sample(cond, x, torch.Generator().manual_seed(0))  # (3, 8, 2)
    assert delta.shape == x.shape and (delta[:, 0] == 0).all() and (delta[:, 5:] == 0).all()
    log_prob, mean, std = residual.log_prob(delta, cond, x)
    assert mean.shape == (3, 4, 2) and mean.abs().max() <= residual.max_delta
    expected = Normal(mean, std.expand_as(mean)).log_prob(delta[:, 1:5]).flatten(1).sum(1)
    torch.testing.assert_close(log_prob, expected)
    torch.testing.assert_close(residual.correct(cond, x)[:, 1:5], x[:, 1:5] + mean)


def test_the_checkpointed_settings_rebuild_it_and_nothing_else():
    policy = make_tiny_policy()
    settings = _residual(policy, hidden_dims=[16, 8], max_delta=0.2).config()
    assert settings == {"hidden_dims": [16, 8], "init_std": 0.02, "max_delta": 0.2}
    with pytest.raises(ValueError, match=r"residual_policy: unknown keys \['_target_'\]"):
        _residual(policy, _target_="os.system")
    with pytest.raises(ValueError, match="max_delta=0"):
        _residual(policy, max_delta=0)
    with pytest.raises(ValueError, match="do not fit the horizon 8"):
        ResidualPolicy(40, 8, 2, 1, 8)


def test_a_corrected_policy_keeps_its_chunk_length():
    policy = make_tiny_policy()
    policy.residual_policy = _residual(policy)
    with pytest.raises(ValueError, match="corrects chunks of 4 actions"):
        policy.set_n_action_steps(2)
