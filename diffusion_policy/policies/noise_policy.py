"""A learned distribution of a diffusion policy's initial noise (latent-noise steering, DSRL).

A diffusion policy's sampler maps Gaussian noise ``w ~ N(0, I)`` (T, Da) and the observation to
an action chunk. Replacing ``N(0, I)`` by ``N(mu(obs), diag(sigma^2))`` steers which of the
policy's behaviours the sampler produces without changing the denoiser (Wagenmaker et al. 2025,
"Steering Your Diffusion Policy with Latent Space Reinforcement Learning"). Initialized with
``mu = 0`` and ``sigma = init_std = 1``, it is exactly the distribution the sampler draws from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)
# The keys of ``policy.noise_policy`` in a policy config (checkpoints store it as data).
NOISE_POLICY_KEYS = ("hidden_dims", "init_std", "max_mean")


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, std^2)`` per element (broadcast shape), not reduced."""
    z = (x - mean) / std
    return -0.5 * z**2 - std.log() - 0.5 * _LOG_2PI


class NoisePolicy(nn.Module):
    """``N(mu(obs), diag(sigma^2))`` over the sampler's initial noise (T, Da).

    Args:
        input_dim: Size of the flattened observation features, To * F.
        horizon: T.
        action_dim: Da.
        hidden_dims: Widths of the mean's hidden layers.
        init_std: The initial standard deviation (a learned parameter per element).
        max_mean: Bound of ``|mu|`` (``max_mean * tanh(out / max_mean)``): far from the noise
            the denoiser was trained on, its samples mean nothing.

    Raises:
        ValueError: A value out of range, naming it.
    """

    def __init__(
        self,
        input_dim: int,
        horizon: int,
        action_dim: int,
        hidden_dims: tuple[int, ...] | list[int] = (256, 256),
        init_std: float = 1.0,
        max_mean: float = 2.5,
    ) -> None:
        super().__init__()
        for name, value in (("init_std", init_std), ("max_mean", max_mean)):
            if not value > 0:
                raise ValueError(f"noise_policy.{name}={value} must be > 0")
        self.shape = (horizon, action_dim)
        self.max_mean = float(max_mean)
        self.init_std = float(init_std)
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, int(hidden)), nn.Mish()]
            width = int(hidden)
        last = nn.Linear(width, horizon * action_dim)
        nn.init.zeros_(last.weight)  # mu = 0 until trained: the sampler's own N(0, I)
        nn.init.zeros_(last.bias)
        self.mean_net = nn.Sequential(*layers, last)
        self.log_std = nn.Parameter(torch.full(self.shape, math.log(init_std)))

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], input_dim: int, horizon: int, action_dim: int
    ) -> NoisePolicy:
        """Builds one from a policy config's ``noise_policy`` settings (plain values only).

        Raises:
            ValueError: An unknown key, naming it.
        """
        unknown = sorted(set(config) - set(NOISE_POLICY_KEYS))
        if unknown:
            raise ValueError(
                f"policy.noise_policy: unknown keys {unknown}; known: {NOISE_POLICY_KEYS}"
            )
        return cls(input_dim, horizon, action_dim, **config)

    def config(self) -> dict[str, Any]:
        """The settings :meth:`from_config` rebuilds this module's shape from."""
        hidden = [m.out_features for m in self.mean_net[:-1] if isinstance(m, nn.Linear)]
        return {
            "hidden_dims": hidden,
            "init_std": self.init_std,
            "max_mean": self.max_mean,
        }

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean (B, T, Da) and standard deviation (T, Da) given features (B, To, F)."""
        out = self.mean_net(cond.flatten(1).float()).view(-1, *self.shape)
        mean = self.max_mean * torch.tanh(out / self.max_mean)
        return mean, self.log_std.clamp(-5.0, 2.0).exp()

    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws initial noise (B, T, Da); the generator may live on another device."""
        mean, std = self(cond)
        device = cond.device if generator is None else generator.device
        eps = torch.randn(mean.shape, generator=generator, device=device).to(mean.device)
        return mean + std * eps

    def log_prob(
        self, w: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log N(w; mu(cond), sigma^2)`` summed over (T, Da): (B,), with the mean and std."""
        mean, std = self(cond)
        return gaussian_log_density(w, mean, std).flatten(1).sum(1), mean, std
