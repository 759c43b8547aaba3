"""The value network of RL fine-tuning: an MLP on the policy's observation features."""

from __future__ import annotations

import torch
from torch import nn


class ValueMLP(nn.Module):
    """V(obs) from the flattened observation features (B, To, F) the policy's encoder makes.

    For low-dim tasks these are the normalized observations of the history; for image tasks
    the encoder's features (the critic then learns on features it does not change).

    Args:
        input_dim: To * F.
        hidden_dims: Widths of the hidden layers.
    """

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...] | list[int] = (256, 256)):
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim={input_dim} must be >= 1")
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Mish()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Maps features (B, To, F) to values (B,)."""
        return self.net(features.flatten(1)).squeeze(-1)
