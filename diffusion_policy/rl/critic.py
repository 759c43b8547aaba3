"""The value network of RL fine-tuning: an MLP on the policy's observation features and time."""

from __future__ import annotations

import torch
from torch import nn


class ValueMLP(nn.Module):
    """V(obs, elapsed) from the observation features (B, To, F) and the episode's elapsed time.

    The features are those the policy's encoder makes: for low-dim tasks the normalized
    observations of the history; for image tasks the encoder's features (the critic then learns
    on features it does not change). Episodes end at a step budget, so what is left to earn
    depends on the time as much as on the state: the critic also sees the fraction of the
    budget spent (Pardo et al. 2018, "Time Limits in Reinforcement Learning").

    Args:
        input_dim: To * F.
        hidden_dims: Widths of the hidden layers.
    """

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...] | list[int] = (256, 256)):
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim={input_dim} must be >= 1")
        layers: list[nn.Module] = []
        width = input_dim + 1  # + the elapsed fraction
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Mish()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, elapsed: torch.Tensor) -> torch.Tensor:
        """Maps features (B, To, F) and elapsed fractions in [0, 1] (B,) to values (B,)."""
        x = torch.cat([features.flatten(1), elapsed.to(features.dtype)[:, None]], dim=1)
        return self.net(x).squeeze(-1)
