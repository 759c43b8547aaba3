"""Generalized advantage estimation (Schulman et al. 2016) over environment decisions."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    last_values: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets of a rollout of N decisions in E envs.

    ``delta_n = r_n + gamma * (1 - done_n) * V_{n+1} - V_n`` and
    ``A_n = delta_n + gamma * lam * (1 - done_n) * A_{n+1}``, with ``V_N = last_values``.

    Args:
        rewards: Reward of each decision (N, E).
        values: The critic's value of each decision's observation (N, E).
        last_values: Values of the observations after the last decision (E,).
        dones: 1 where the episode ended with the decision (no bootstrap past it) (N, E).
        gamma: Discount per decision, in [0, 1].
        lam: GAE's lambda, in [0, 1].

    Returns:
        ``advantages`` (N, E) and ``returns`` = advantages + values (N, E).
    """
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1]")
    if not rewards.shape == values.shape == dones.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and dones "
            f"{tuple(dones.shape)} must have one shape (N, E)"
        )
    advantages = torch.zeros_like(rewards)
    next_value, next_adv = last_values, torch.zeros_like(last_values)  # (E,)
    for n in reversed(range(rewards.shape[0])):
        alive = 1.0 - dones[n].to(rewards.dtype)
        delta = rewards[n] + gamma * alive * next_value - values[n]
        next_adv = delta + gamma * lam * alive * next_adv
        advantages[n] = next_adv
        next_value = values[n]
    return advantages, advantages + values
