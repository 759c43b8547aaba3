"""GAE and the group baseline against hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.rl.gae import gae, group_advantages


def test_gae_by_hand():
    # One env, 3 decisions, the episode ends with the second; gamma 0.5, lambda 0.5.
    rewards = torch.tensor([[1.0], [2.0], [4.0]])
    values = torch.tensor([[0.5], [1.0], [2.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    last = torch.tensor([8.0])
    adv, ret = gae(rewards, values, last, dones, gamma=0.5, lam=0.5)
    # n=2: delta = 4 + 0.5 * 8 - 2 = 6; A = 6
    # n=1: done, delta = 2 - 1 = 1; A = 1 (no bootstrap past the end)
    # n=0: delta = 1 + 0.5 * 1 - 0.5 = 1; A = 1 + 0.25 * 1 = 1.25
    torch.testing.assert_close(adv, torch.tensor([[1.25], [1.0], [6.0]]))
    torch.testing.assert_close(ret, adv + values)


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    values = torch.zeros(2, 2)
    adv, _ = gae(rewards, values, torch.zeros(2), torch.zeros(2, 2), gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.9, 0.9], [1.0, 1.0]]))


def test_gae_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma=1.5"):
        gae(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1), 1.5, 0.9)


def test_group_advantage_is_the_return_against_the_groups_other_episodes():
    # 4 envs in 2 groups of 2; env 1's episode ended after one decision.
    rewards = torch.tensor([[1.0, 5.0, 2.0, 0.0], [3.0, 7.0, 2.0, 1.0]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    adv = group_advantages(rewards, valid, group_size=2)
    # Returns: 4, 5 (the invalid 7 is not counted), 4, 1. Leave-one-out: 4 - 5, 5 - 4, 4 - 1, 1 - 4.
    expected = torch.tensor([[-1.0, 1.0, 3.0, -3.0], [-1.0, 0.0, 3.0, -3.0]])
    torch.testing.assert_close(adv, expected)


@pytest.mark.parametrize("group_size", [1, 3])
def test_group_size_must_divide_the_envs(group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        group_advantages(torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), group_size)
