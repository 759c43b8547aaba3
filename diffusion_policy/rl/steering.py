"""Latent-noise steering: RL on the initial noise of a frozen diffusion policy (DSRL).

The policy's sampler maps its initial noise ``w`` (T, Da) and the observation to an action
chunk. With a :class:`~diffusion_policy.policies.noise_policy.NoisePolicy` drawing ``w`` from
``N(mu(obs), sigma^2)``, the pair is a Gaussian policy whose action is ``w`` and whose
environment includes the sampler (Wagenmaker et al. 2025). PPO then trains a small MLP instead
of the denoiser: one log-density per decision instead of one per chain step, so an update costs
almost nothing beside the rollouts, and the sampler that is deployed is the one the rollouts
ran. :class:`NoiseSteering` offers what :func:`~diffusion_policy.rl.rollouts.collect` and
:func:`~diffusion_policy.rl.ppo.ppo_update` use of a :class:`~diffusion_policy.rl.chain.
DenoisingChain`, as a chain of one step: noise -> w.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.rl.chain import ChainSample


class NoiseSteering(nn.Module):
    """Samples and scores a policy's initial noise with its ``noise_policy``.

    Args:
        policy: A diffusion policy with a ``noise_policy``; its denoiser stays as it is.

    Raises:
        ValueError: The policy has no ``noise_policy``.
    """

    ft_steps = 1  # one scored step per decision: the draw of w

    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        if policy.noise_policy is None:
            raise ValueError("NoiseSteering needs a policy with a noise_policy")
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
        """Draws ``w`` and runs the policy's sampler from it.

        Args:
            cond: Observation features (B, To, F).
            generator: Random generator for reproducible draws.
            offset: The relative-action origin (B, 1, Da), or None.

        Returns:
            A :class:`ChainSample` whose ``samples`` are (0, w) (B, 2, T, Da) and
            ``log_probs`` the draw's log-density (B, 1).
        """
        policy = self.policy
        w = policy.initial_noise(cond, generator)  # (B, T, Da)
        log_prob, _, _ = policy.noise_policy.log_prob(w, cond)  # (B,)
        x = policy.denoise(w, cond, generator)
        return ChainSample(
            action=policy.actions_from_sample(x, offset)["action_pred"],
            samples=torch.stack([torch.zeros_like(w), w], 1),
            log_probs=log_prob[:, None],
        )

    def step_log_prob(
        self, x: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log N(x_prev; mu(cond), sigma^2)`` (B,) with the mean (B, T, Da) and std (T, Da);
        ``x`` and ``t`` (the chain step's input) are unused."""
        return self.policy.noise_policy.log_prob(x_prev, cond)

    def kl_to_base(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over the batch of KL(N(mean, std^2) || N(0, I)), summed over the chunk: how far
        the noise is steered from what the denoiser was trained on."""
        kl = -std.log() + 0.5 * (std**2 + mean**2) - 0.5  # (B, T, Da)
        return kl.flatten(1).sum(1).mean()
