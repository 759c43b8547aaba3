"""Advantage-weighted regression of the denoiser on the chain's own samples (AWR for diffusion).

An alternative to PPO's update (``algo: awr``): the policy's sampled action chunks are fit with
the diffusion training loss, each weighted by ``exp(A / beta)`` of its decision's advantage
(Peng et al. 2019, "Advantage-Weighted Regression"; DPPO's DAWR baseline). The weighted fit
moves the policy toward ``pi(a | s) exp(A(s, a) / beta)``; a very large ``beta`` fits the
policy to its own samples (no improvement: the control). Each sample costs one denoiser pass
at a random diffusion step rather than one per fine-tuned chain step, and every diffusion step
is trained, so any sampler of the policy, the deployed one included, sees the change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.ppo import PPOBatch, _guarded_step, _value_loss


@dataclass
class AWRConfig:
    """Settings of :func:`awr_update` (``awr`` in ``configs/finetune/finetune.yaml``)."""

    epochs: int = 2
    minibatch_size: int = 256  # decisions per gradient step
    beta: float = 1.0  # temperature on the normalized advantages
    max_weight: float = 20.0  # weights are clipped to this (AWR's bound)
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    critic_warmup: int = 0  # first iterations that train only the critic (the fine-tuner's)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"awr.epochs={self.epochs} must be >= 0")
        if self.minibatch_size < 1:
            raise ValueError(f"awr.minibatch_size={self.minibatch_size} must be >= 1")
        if not self.beta > 0:
            raise ValueError(f"awr.beta={self.beta} must be > 0")
        if not self.max_weight > 0:
            raise ValueError(f"awr.max_weight={self.max_weight} must be > 0")


def awr_weights(advantages: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """``min(exp(A_norm / beta), max_weight)`` of advantages normalized over the batch (M,)."""
    adv = advantages
    if adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return (adv / beta).exp().clamp(max=max_weight)


def awr_update(
    policy: DiffusionPolicy,
    critic: ValueMLP,
    actor_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer,
    batch: PPOBatch,
    cfg: AWRConfig,
    generator: torch.Generator | None = None,
    train_actor: bool = True,
) -> dict[str, float]:
    """Runs ``cfg.epochs`` epochs of weighted denoising regression and value regression.

    Args:
        policy: The policy whose denoiser is fit.
        critic: The value network.
        actor_opt: Optimizer of the denoiser.
        critic_opt: Optimizer of the critic.
        batch: The decisions; ``samples[:, -1]`` are the sampled chunks (normalized).
        cfg: The settings.
        generator: Random generator of the minibatch order.
        train_actor: False: only the critic steps (a warm-up).

    Returns:
        Means over the minibatches of ``awr_loss``, ``value_loss``, ``grad_norm``; the
        weights' ``weight_max`` and effective sample fraction ``weight_ess`` (1 = uniform);
        the count ``n_skipped`` of non-finite minibatches.
    """
    M = batch.advantages.shape[0]
    clip = policy.clip_range()
    x0 = batch.samples[:, -1]  # (M, T, Da)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    weights = awr_weights(batch.advantages, cfg.beta, cfg.max_weight)  # (M,)
    sums: dict[str, float] = {}
    n_batches, n_skipped = 0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(M, generator=generator).to(x0.device)
        for m in perm.split(cfg.minibatch_size):
            value_loss = _value_loss(critic, batch, m)
            loss = cfg.vf_coef * value_loss
            opts: tuple[torch.optim.Optimizer, ...] = (critic_opt,)
            awr_loss = torch.zeros(())
            if train_actor:
                w = weights[m]
                error = policy.denoising_error(x0[m], batch.cond[m])  # (b,)
                awr_loss = (w * error).sum() / w.sum()
                loss = loss + awr_loss
                opts = (actor_opt, critic_opt)
            norms = _guarded_step(loss, opts, cfg.max_grad_norm)
            if norms is None:
                n_skipped += 1
                continue
            n_batches += 1
            stats = {"value_loss": float(value_loss.detach()), "awr_loss": float(awr_loss.detach())}
            if train_actor:
                stats["grad_norm"] = norms[0]
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
    metrics = {key: value / max(n_batches, 1) for key, value in sums.items()}
    metrics["weight_max"] = float(weights.max()) if M else 0.0
    metrics["weight_ess"] = float(weights.sum() ** 2 / (M * (weights**2).sum())) if M else 0.0
    metrics["n_skipped"] = float(n_skipped)
    return metrics
