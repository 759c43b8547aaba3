"""Building blocks shared by the denoisers."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalStepEmbedding(nn.Module):
    """Fixed sinusoidal embedding of the diffusion step, as in the Transformer's positions.

    Args:
        dim: Embedding size (even).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"step embedding dim={dim} must be even")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embeds steps of shape (B,) into (B, dim)."""
        angles = t.float()[:, None] * self.freqs[None, :]  # (B, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class StepEncoder(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP: the denoisers' step conditioning."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            SinusoidalStepEmbedding(dim),
            nn.Linear(dim, dim * 4),
            nn.Mish(),
            nn.Linear(dim * 4, dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Maps steps (B,) to features (B, dim)."""
        return self.net(t)
