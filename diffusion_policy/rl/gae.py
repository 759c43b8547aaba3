"""Advantages over environment decisions: GAE (Schulman et al. 2016) with the critic, or the
episode return against the other episodes of its group (episodes from one initial state)."""

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


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each episode's return minus the mean return of the other episodes of its group.

    Envs ``g * group_size .. (g + 1) * group_size - 1`` ran one initial state (seed) with
    different chain noise, so the leave-one-out mean is a baseline free of the initial state's
    difficulty, which on Push-T explains about half the variance of the returns and the critic
    little of it (RLOO, Kool et al. 2019). Every decision of an episode gets its advantage.

    Args:
        rewards: Reward of each decision (N, E).
        valid: Whether the decision belongs to the env's episode (N, E).
        group_size: Episodes per initial state (>= 2), dividing E.

    Returns:
        Advantages (N, E), zero where ``valid`` is False.
    """
    N, E = rewards.shape
    if group_size < 2 or E % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {E} envs")
    returns = (rewards * valid).sum(0).view(-1, group_size)  # (E / G, G)
    others = (returns.sum(1, keepdim=True) - returns) / (group_size - 1)
    return (returns - others).view(1, E) * valid
