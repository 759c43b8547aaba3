"""The critic sees the time: equal observations at different times can have different values."""

from __future__ import annotations

import torch

from diffusion_policy.rl.critic import ValueMLP


def test_critic_learns_a_value_that_depends_only_on_time():
    torch.manual_seed(0)
    critic = ValueMLP(input_dim=6, hidden_dims=[32])
    features = torch.zeros(16, 2, 3)  # one observation, seen at 16 times
    elapsed = torch.linspace(0, 1, 16)
    target = 10 * (1 - elapsed)  # what is left to earn falls with the time spent
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = (critic(features, elapsed) - target).pow(2).mean()
        loss.backward()
        opt.step()
    values = critic(features, elapsed).detach()
    assert values.shape == (16,)
    assert (values - target).abs().max() < 0.5, values
