"""The clipped PPO update over (decision, denoising step) pairs (DPPO, Ren et al. 2024).

Each fine-tuned denoising step of a decision's chain is an action of a two-level MDP whose
reward is the decision's: all K steps of a decision share its advantage. The ratio of a pair is
``exp(log p_new(x_{k-1} | x_k) - log p_old(x_{k-1} | x_k))``, clipped to ``1 +- clip_ratio``
in the surrogate. A step's density is over the whole (T, Da) chunk, so ratios move fast:
``clip_ratio`` is small (DPPO uses about 0.01).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from diffusion_policy.rl.chain import DenoisingChain
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.steering import NoiseSteering

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    """Settings of :func:`ppo_update` (``ppo`` in ``configs/finetune/finetune.yaml``)."""

    epochs: int = 5
    minibatch_size: int = 256  # (decision, step) pairs per gradient step
    clip_ratio: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    target_kl: float | None = None  # stop the epochs once the approximate KL passes it
    kl_coef: float = 0.0  # Gaussian KL toward the initial denoiser's step (0: off)
    norm_adv: bool = True
    critic_warmup: int = 0  # first iterations that train only the critic (the fine-tuner's)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"ppo.epochs={self.epochs} must be >= 0")
        if self.minibatch_size < 1:
            raise ValueError(f"ppo.minibatch_size={self.minibatch_size} must be >= 1")
        if not self.clip_ratio > 0:
            raise ValueError(f"ppo.clip_ratio={self.clip_ratio} must be > 0")


@dataclass
class PPOBatch:
    """M valid decisions, flattened from a rollout.

    Attributes:
        cond: Observation features (M, To, F).
        elapsed: The spent fraction of the episode's step budget (M,).
        samples: Fine-tuned chain steps x_K..x_0 (M, K + 1, T, Da).
        log_probs: Their log-densities when sampled (M, K).
        advantages: (M,).
        returns: Value targets (M,).
    """

    cond: torch.Tensor
    elapsed: torch.Tensor
    samples: torch.Tensor
    log_probs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def ppo_update(
    chain: DenoisingChain | NoiseSteering,
    critic: ValueMLP,
    actor_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer,
    batch: PPOBatch,
    cfg: PPOConfig,
    generator: torch.Generator | None = None,
    train_actor: bool = True,
) -> dict[str, float]:
    """Runs ``cfg.epochs`` epochs of minibatch PPO on ``batch``.

    A minibatch whose loss or gradient is not finite is skipped (no optimizer step). With
    ``train_actor=False`` only the critic steps (a warm-up: advantages from an untrained critic
    would move the policy at random).

    Returns:
        Means over the minibatches: ``pg_loss``, ``value_loss``, ``approx_kl``, ``clip_frac``,
        ``kl_to_init``, ``log_std`` (the entropy proxy), and the count ``n_skipped``; in a
        warm-up (``train_actor=False``) ``value_loss`` and ``n_skipped`` only.
    """
    M, K = batch.log_probs.shape
    adv = batch.advantages
    if cfg.norm_adv and M > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    t_of_step = chain.ft_timesteps().to(batch.samples.device)  # (K,)
    sums: dict[str, float] = {}
    n_batches, n_skipped = 0, 0
    if K == 0:  # nothing fine-tuned: only the critic would learn; keep the policy as it is
        log.warning("ft_steps=0: the PPO update changes nothing")
        return {"n_skipped": 0.0}
    for _ in range(cfg.epochs):
        perm = torch.randperm(M * K, generator=generator).to(batch.samples.device)
        epoch_kl = []
        for idx in perm.split(cfg.minibatch_size):
            m, k = idx // K, idx % K  # decision and step of each pair
            stats = _minibatch_step(
                chain, critic, actor_opt, critic_opt, cfg, batch, adv, t_of_step, m, k, train_actor
            )
            if stats is None:
                n_skipped += 1
                continue
            n_batches += 1
            if "approx_kl" in stats:  # not in a critic-only warm-up step
                epoch_kl.append(stats["approx_kl"])
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
        if cfg.target_kl is not None and epoch_kl and sum(epoch_kl) / len(epoch_kl) > cfg.target_kl:
            break
    metrics = {key: value / max(n_batches, 1) for key, value in sums.items()}
    metrics["n_skipped"] = float(n_skipped)
    return metrics


def _minibatch_step(
    chain: DenoisingChain | NoiseSteering,
    critic: ValueMLP,
    actor_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer,
    cfg: PPOConfig,
    batch: PPOBatch,
    adv: torch.Tensor,
    t_of_step: torch.Tensor,
    m: torch.Tensor,
    k: torch.Tensor,
    train_actor: bool = True,
) -> dict[str, float] | None:
    """One gradient step on the pairs (m, k); None if it was skipped as non-finite."""
    if not train_actor:  # a warm-up step: the denoiser's forward and backward would be wasted
        return _critic_step(critic, critic_opt, cfg, batch, m)
    x = batch.samples[m, k]  # (b, T, Da)
    x_prev = batch.samples[m, k + 1]  # (b, T, Da)
    cond, t = batch.cond[m], t_of_step[k]  # (b, To, F), (b,)
    log_prob, mean, std = chain.step_log_prob(x, t, x_prev, cond)  # (b,)
    log_ratio = log_prob - batch.log_probs[m, k]
    ratio = log_ratio.exp()
    a = adv[m]
    pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio))
    pg_loss = pg_loss.mean()
    value_loss = _value_loss(critic, batch, m)
    loss = pg_loss + cfg.vf_coef * value_loss
    kl_to_init = torch.zeros(())
    if cfg.kl_coef > 0:
        kl_to_init = chain.kl_to_base(x, t, cond, mean, std)
        loss = loss + cfg.kl_coef * kl_to_init

    norms = _guarded_step(loss, (actor_opt, critic_opt), cfg.max_grad_norm)
    if norms is None:
        return None
    with torch.no_grad():
        return {
            "pg_loss": float(pg_loss),
            "value_loss": float(value_loss),
            "approx_kl": float(((ratio - 1) - log_ratio).mean()),
            "clip_frac": float(((ratio - 1).abs() > cfg.clip_ratio).float().mean()),
            "kl_to_init": float(kl_to_init),
            "log_std": float(std.log().mean()),
            "grad_norm": norms[0],
        }


def _critic_step(
    critic: ValueMLP,
    critic_opt: torch.optim.Optimizer,
    cfg: PPOConfig,
    batch: PPOBatch,
    m: torch.Tensor,
) -> dict[str, float] | None:
    """One gradient step of the critic alone on the decisions ``m``; None if non-finite."""
    value_loss = _value_loss(critic, batch, m)
    if _guarded_step(cfg.vf_coef * value_loss, (critic_opt,), cfg.max_grad_norm) is None:
        return None
    return {"value_loss": float(value_loss.detach())}


def _value_loss(critic: ValueMLP, batch: PPOBatch, m: torch.Tensor) -> torch.Tensor:
    """Half the mean squared error of the critic's values of the decisions ``m``."""
    return 0.5 * (critic(batch.cond[m], batch.elapsed[m]) - batch.returns[m]).pow(2).mean()


def _guarded_step(
    loss: torch.Tensor, optimizers: tuple[torch.optim.Optimizer, ...], max_norm: float
) -> list[float] | None:
    """Backward, per-optimizer gradient clipping and a step of each optimizer, unless the loss
    or a gradient norm is non-finite (then no parameter moves and None is returned).

    Returns:
        Each optimizer's gradient norm before clipping.
    """
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        log.warning("PPO: non-finite loss %s; minibatch skipped", float(loss.detach()))
        return None
    loss.backward()
    norms = [_clip(opt, max_norm) for opt in optimizers]
    if not all(math.isfinite(n) for n in norms):
        log.warning("PPO: non-finite gradient norm; minibatch skipped")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return None
    for opt in optimizers:
        opt.step()
    return norms


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clips the gradients of an optimizer's parameters; returns their norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return 0.0
    return float(nn.utils.clip_grad_norm_(params, max_norm))
