"""GAE against a hand-computed example."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.rl.gae import gae


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
