"""A learned correction of a diffusion policy's executed actions (residual RL).

The cloned policy gets close and then misses by a little: on Push-T most failed episodes end
at 85-95% coverage. A small Gaussian policy that sees the observation and the chunk the
sampler produced, and adds a bounded correction to the actions that will be executed, can
learn that last bit from reward while the denoiser stays as trained (after ResiP, Ankile et
al. 2024, "From Imitation to Refinement: Residual RL for Precise Assembly"). Its mean starts
at zero, so before training the policy acts as the cloned one. Deployed, the mean is added.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion_policy.policies.noise_policy import GaussianMLP, gaussian_log_density

# The keys of ``policy.residual_policy`` in a policy config (checkpoints store it as data).
RESIDUAL_POLICY_KEYS = ("hidden_dims", "init_std", "max_delta")


class ResidualPolicy(GaussianMLP):
    """``N(mu(obs, x), diag(sigma^2))`` over a correction of the executed rows of a sample.

    The sample ``x`` (B, T, Da) is the sampler's normalized output; rows ``start`` to
    ``start + n_action_steps`` are the actions the env executes. The correction has that
    window's shape (Ta, Da); the other rows are left alone.

    Args:
        input_dim: Size of the flattened observation features, To * F.
        horizon: T.
        action_dim: Da.
        start: First executed row (``n_obs_steps - 1``).
        n_action_steps: Executed rows (Ta).
        hidden_dims: Widths of the mean's hidden layers.
        init_std: The initial standard deviation, in normalized action units (learned).
        max_delta: Bound of ``|mu|``, in normalized action units: a correction, not a new
            action.

    Raises:
        ValueError: A value out of range, naming it.
    """

    def __init__(
        self,
        input_dim: int,
        horizon: int,
        action_dim: int,
        start: int,
        n_action_steps: int,
        hidden_dims: tuple[int, ...] | list[int] = (256, 256),
        init_std: float = 0.02,
        max_delta: float = 0.1,
    ) -> None:
        if not max_delta > 0:
            raise ValueError(f"residual_policy.max_delta={max_delta} must be > 0")
        if not 0 <= start < start + n_action_steps <= horizon:
            raise ValueError(
                f"residual_policy: executed rows {start}..{start + n_action_steps - 1} do not "
                f"fit the horizon {horizon}"
            )
        window = (n_action_steps, action_dim)
        inputs = input_dim + n_action_steps * action_dim
        super().__init__(inputs, window, hidden_dims, init_std, max_delta, "residual_policy")
        self.max_delta = float(max_delta)
        self.rows = slice(start, start + n_action_steps)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        input_dim: int,
        horizon: int,
        action_dim: int,
        start: int,
        n_action_steps: int,
    ) -> ResidualPolicy:
        """Builds one from a policy config's ``residual_policy`` settings (plain values only).

        Raises:
            ValueError: An unknown key, naming it.
        """
        cls.check_keys(config, RESIDUAL_POLICY_KEYS, "residual_policy")
        return cls(input_dim, horizon, action_dim, start, n_action_steps, **config)

    def config(self) -> dict[str, Any]:
        """The settings :meth:`from_config` rebuilds this module's shape from."""
        return {
            "hidden_dims": self.hidden_dims(),
            "init_std": self.init_std,
            "max_delta": self.max_delta,
        }

    def forward(self, cond: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean (B, Ta, Da) and std (Ta, Da) given features (B, To, F) and the sample
        (B, T, Da)."""
        inputs = torch.cat([cond.flatten(1), x[:, self.rows].flatten(1)], 1)  # (B, To*F + Ta*Da)
        return self.gaussian(inputs)

    def pad(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A window's correction (B, Ta, Da) as a correction of the whole sample (B, T, Da)."""
        full = torch.zeros_like(x)
        full[:, self.rows] = delta.to(x.dtype)
        return full

    def correct(self, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The deployed sample: ``x`` plus the mean correction of its executed rows."""
        mean, _ = self(cond, x)
        return x + self.pad(mean, x)

    def sample(
        self, cond: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws a correction, padded to the sample's shape (B, T, Da)."""
        return self.pad(self.draw(*self(cond, x), generator), x)

    def log_prob(
        self, delta: torch.Tensor, cond: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log N(delta; mu(cond, x), sigma^2)`` over the executed rows of a padded correction
        (B, T, Da): (B,), with the mean (B, Ta, Da) and std (Ta, Da)."""
        mean, std = self(cond, x)
        log_density = gaussian_log_density(delta[:, self.rows].float(), mean, std)
        return log_density.flatten(1).sum(1), mean, std
