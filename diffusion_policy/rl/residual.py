"""Residual RL: PPO on a correction of a frozen diffusion policy's executed actions.

The policy samples its chunk ``x`` as deployed (its sampler, from its initial noise, which a
fixed ``noise_policy`` may temper); a
:class:`~diffusion_policy.policies.residual_policy.ResidualPolicy` then draws a correction
``delta ~ N(mu(obs, x), sigma^2)`` of the executed rows, and the env executes ``x + delta``.
The correction is the action PPO scores, one Gaussian per decision as in latent-noise
steering (:mod:`~diffusion_policy.rl.steering`); unlike steering it can leave the cloned
policy's support by up to ``max_delta``. :class:`ResidualActor` offers what
:func:`~diffusion_policy.rl.rollouts.collect` and :func:`~diffusion_policy.rl.ppo.ppo_update`
use, as a chain of one step: ``x -> delta``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.rl.chain import ChainSample


class ResidualActor(nn.Module):
    """Samples and scores corrections with a policy's ``residual_policy``.

    Args:
        policy: A diffusion policy with a ``residual_policy``; the rest stays as it is.

    Raises:
        ValueError: The policy has no ``residual_policy``.
    """

    ft_steps = 1  # one scored step per decision: the draw of the correction

    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        if policy.residual_policy is None:
            raise ValueError("ResidualActor needs a policy with a residual_policy")
        self.policy = policy

    def ft_timesteps(self) -> torch.Tensor:
        """A placeholder timestep for the one scored step (PPO passes it back unused)."""
        return torch.zeros(1, dtype=torch.long)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        offset: torch.Tensor | None = None,
    ) -> ChainSample:
        """Samples the policy's chunk and a correction of it.

        Args:
            cond: Observation features (B, To, F).
            generator: Random generator for reproducible draws.
            offset: The relative-action origin (B, 1, Da), or None.

        Returns:
            A :class:`ChainSample` whose ``samples`` are (x, delta) (B, 2, T, Da), the
            sampler's normalized chunk and its correction (zero outside the executed rows),
            and ``log_probs`` the correction's log-density (B, 1).
        """
        policy, residual = self.policy, self.policy.residual_policy
        x = policy.denoise(policy.initial_noise(cond, generator), cond, generator)  # (B, T, Da)
        delta = residual.sample(cond, x, generator)  # (B, T, Da)
        log_prob, _, _ = residual.log_prob(delta, cond, x)  # (B,)
        return ChainSample(
            action=policy.actions_from_sample(x + delta, offset)["action_pred"],
            samples=torch.stack([x, delta], 1),
            log_probs=log_prob[:, None],
        )

    def step_log_prob(
        self, x: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log N(delta; mu(cond, x), sigma^2)`` (B,) of the correction ``x_prev`` of the chunk
        ``x``, with the mean (B, Ta, Da) and std (Ta, Da); ``t`` is unused."""
        return self.policy.residual_policy.log_prob(x_prev, cond, x)

    def kl_to_base(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over the batch of KL(N(mean, std^2) || N(0, s0^2)), summed over the window,
        with ``s0`` the initial std: how far the correction moved from none."""
        s0 = self.policy.residual_policy.init_std
        kl = (s0 / std).log() + 0.5 * (std**2 + mean**2) / s0**2 - 0.5  # (B, Ta, Da)
        return kl.flatten(1).sum(1).mean()
