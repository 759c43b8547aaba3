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
        self.register_buffer("freqs", _frequencies(dim // 2), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embeds steps of shape (B,) into (B, dim), in the dtype the module was moved to.

        The angles are always computed in float32: in bf16 (a module converted for bf16
        inference) a step of 99 would be off by up to 0.4 rad.
        """
        freqs = self.freqs
        if freqs.dtype != torch.float32:
            freqs = _frequencies(len(freqs), t.device)
        angles = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.freqs.dtype)


def _frequencies(half: int, device: torch.device | None = None) -> torch.Tensor:
    """The embedding's frequencies (half,), float32: 1 down to 1 / 10000."""
    steps = torch.arange(half, device=device, dtype=torch.float32)
    return torch.exp(-math.log(10000.0) * steps / max(half - 1, 1))


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
