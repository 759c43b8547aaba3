"""Off-policy latent-noise steering: soft actor-critic over the sampler's initial noise.

With ``actor=noise`` the decision's action is the initial noise ``w`` (T, Da) the frozen
policy's sampler denoises (see :mod:`~diffusion_policy.rl.steering`). PPO learns from each
episode once; soft actor-critic (Haarnoja et al. 2018) keeps every decision in a replay buffer
and fits a twin Q-function ``Q(obs, elapsed, w)`` to it, so the cheap updates of a small MLP
can be many per collected decision while the rollouts stay the cost (DSRL's SAC variant,
Wagenmaker et al. 2025). The noise policy's mean follows ``Q``'s gradient through the
reparameterized draw ``w = mu + sigma * eps``; its std is held near ``target_std`` by the
learned entropy weight ``alpha``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.rl.rollouts import Rollout

log = logging.getLogger(__name__)

_ENTROPY_UNIT = 0.5 * math.log(2.0 * math.pi * math.e)  # a unit Gaussian's entropy per dim


@dataclass
class SACConfig:
    """Settings of :class:`SoftActorCritic` (``sac`` in ``configs/finetune/finetune.yaml``)."""

    updates_per_decision: float = 0.5  # gradient steps per collected (valid) decision
    batch_size: int = 256
    buffer_size: int = 200_000  # decisions kept (the oldest are overwritten)
    tau: float = 0.005  # Polyak rate of the target Q
    q_lr: float = 3.0e-4
    alpha_lr: float = 3.0e-4
    init_alpha: float = 0.01
    target_std: float = 0.6  # the entropy target is that of N(., target_std^2) per element
    max_grad_norm: float = 10.0
    critic_warmup: int = 2  # first iterations that train only Q (the fine-tuner's)

    def __post_init__(self) -> None:
        for name in ("updates_per_decision", "tau", "init_alpha", "target_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sac.{name}={getattr(self, name)} must be > 0")
        for name in ("batch_size", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sac.{name}={getattr(self, name)} must be >= 1")


class TwinQ(nn.Module):
    """Two Q-functions on (features (B, To, F), elapsed (B,), noise (B, T, Da)) -> (2, B).

    Layer normalization after each hidden layer keeps many updates per sample stable
    (Ball et al. 2023, RLPD). ReLU, not the policy's Mish: the Q-functions take most of an
    update's time, and Mish's backward costs 2.4x ReLU's there (AVX2 CPU, one thread).
    """

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...] | list[int] = (256, 256)):
        super().__init__()
        self.heads = nn.ModuleList(self._mlp(input_dim + 1, hidden_dims) for _ in range(2))

    @staticmethod
    def _mlp(width: int, hidden_dims: tuple[int, ...] | list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for hidden in hidden_dims:
            layers += [nn.Linear(width, int(hidden)), nn.LayerNorm(int(hidden)), nn.ReLU()]
            width = int(hidden)
        return nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, cond: torch.Tensor, elapsed: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = torch.cat([cond.flatten(1), elapsed.to(cond.dtype)[:, None], w.flatten(1)], dim=1)
        return torch.stack([head(x).squeeze(-1) for head in self.heads])  # (2, B)


class ReplayBuffer:
    """A ring buffer of decisions: features, elapsed, noise, reward, done, next features/elapsed.

    Args:
        capacity: Decisions kept.
        cond_shape: (To, F).
        noise_shape: (T, Da).
        device: Where the tensors live.
    """

    KEYS = ("cond", "elapsed", "w", "reward", "done", "next_cond", "next_elapsed")

    def __init__(
        self,
        capacity: int,
        cond_shape: tuple[int, ...],
        noise_shape: tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> None:
        shapes = {
            "cond": cond_shape,
            "elapsed": (),
            "w": noise_shape,
            "reward": (),
            "done": (),
            "next_cond": cond_shape,
            "next_elapsed": (),
        }
        self.data = {k: torch.zeros(capacity, *s, device=device) for k, s in shapes.items()}
        self.capacity, self.size, self.pos = capacity, 0, 0

    def __len__(self) -> int:
        return self.size

    def add_rollout(self, rollout: Rollout, reward_scale: float = 1.0) -> int:
        """Adds the rollout's valid decisions that have a next observation or ended; returns
        how many. The next observation of decision n is decision n + 1's of the same env."""
        valid, done = rollout.valid[:-1], rollout.dones[:-1]  # (N - 1, E)
        keep = valid & (done | rollout.valid[1:])
        last = rollout.valid[-1] & rollout.dones[-1]  # the last row only where it ended
        rows = {
            "cond": rollout.cond,  # (N, E, To, F)
            "elapsed": rollout.elapsed,
            "w": rollout.samples[:, :, -1],  # (N, E, T, Da)
            "reward": rollout.rewards * reward_scale,
            "done": rollout.dones.float(),
        }
        new = {k: torch.cat([v[:-1][keep], v[-1][last]]) for k, v in rows.items()}
        next_cond = torch.cat([rollout.cond[1:][keep], rollout.cond[-1][last]])  # unused if done
        next_elapsed = torch.cat([rollout.elapsed[1:][keep], rollout.elapsed[-1][last]])
        new.update(next_cond=next_cond, next_elapsed=next_elapsed)
        n = len(new["reward"])
        for start in range(0, n, self.capacity):  # a rollout larger than the buffer wraps
            self._write({k: v[start : start + self.capacity] for k, v in new.items()})
        return n

    def _write(self, new: dict[str, torch.Tensor]) -> None:
        n = len(new["reward"])
        idx = (self.pos + torch.arange(n)) % self.capacity
        for k, v in new.items():
            self.data[k][idx.to(self.data[k].device)] = v.to(self.data[k])
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A uniform minibatch (with replacement)."""
        idx = torch.randint(self.size, (batch_size,), generator=generator)
        return {k: v[idx.to(v.device)] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, object]:
        n = self.size
        return {"data": {k: v[:n].clone() for k, v in self.data.items()}, "pos": self.pos}

    def load_state_dict(self, state: dict[str, object]) -> None:
        data = state["data"]
        n = len(data["reward"])
        if n > self.capacity:
            raise ValueError(f"replay buffer of {n} decisions > sac.buffer_size={self.capacity}")
        for k in self.KEYS:
            self.data[k][:n] = data[k].to(self.data[k])
        self.size, self.pos = n, int(state["pos"]) % self.capacity


class SoftActorCritic:
    """SAC on a :class:`NoisePolicy`: twin Q with a Polyak target, learned entropy weight.

    Args:
        noise_policy: The actor, trained by ``actor_opt``.
        actor_opt: Its optimizer (the fine-tuner's, with the log std's own lr).
        feature_dim: To * F of the observation features.
        cfg: The settings.
        gamma: Discount per decision.
        hidden_dims: Widths of the Q-functions' hidden layers.
    """

    def __init__(
        self,
        noise_policy: NoisePolicy,
        actor_opt: torch.optim.Optimizer,
        feature_dim: int,
        cfg: SACConfig,
        gamma: float,
        hidden_dims: tuple[int, ...] | list[int] = (256, 256),
    ) -> None:
        device = noise_policy.log_std.device
        self.noise_policy, self.actor_opt, self.cfg, self.gamma = (
            noise_policy,
            actor_opt,
            cfg,
            gamma,
        )
        noise_dim = noise_policy.log_std.numel()
        self.q = TwinQ(feature_dim + noise_dim, hidden_dims).to(device)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=cfg.q_lr)
        self.log_alpha = torch.tensor(math.log(cfg.init_alpha), device=device, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self.target_entropy = noise_dim * (_ENTROPY_UNIT + math.log(cfg.target_std))
        self.buffer: ReplayBuffer | None = None

    def add(self, rollout: Rollout, reward_scale: float) -> int:
        """Stores the rollout's decisions; returns how many were added."""
        if self.buffer is None:
            cond_shape = tuple(rollout.cond.shape[2:])
            self.buffer = ReplayBuffer(
                self.cfg.buffer_size,
                cond_shape,
                tuple(self.noise_policy.shape),
                self.noise_policy.log_std.device,
            )
        return self.buffer.add_rollout(rollout, reward_scale)

    def update(
        self, n_updates: int, generator: torch.Generator, train_actor: bool = True
    ) -> dict[str, float]:
        """``n_updates`` gradient steps of Q (and of the actor and alpha with ``train_actor``)
        on uniform minibatches; a step whose loss is not finite is skipped.

        Returns:
            Means over the steps: ``q_loss``, ``q_mean``, and with the actor ``actor_loss``,
            ``alpha``, ``entropy``, ``log_std``; the count ``n_skipped``.
        """
        sums: dict[str, float] = {}
        n_done, n_skipped = 0, 0
        for _ in range(n_updates):
            batch = self.buffer.sample(self.cfg.batch_size, generator)
            stats = self._step(batch, generator, train_actor)
            if stats is None:
                n_skipped += 1
                continue
            n_done += 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics = {key: value / max(n_done, 1) for key, value in sums.items()}
        metrics["n_skipped"] = float(n_skipped)
        return metrics

    def _draw(
        self, cond: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reparameterized draw w (B, T, Da), its log-density (B,) and the std (T, Da)."""
        mean, std = self.noise_policy(cond)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        w = mean + std * eps
        # log N(w; mean, std^2) with w - mean = std * eps, summed over (T, Da)
        log_prob = (-0.5 * eps**2 - std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return w, log_prob, std

    def _step(
        self, b: dict[str, torch.Tensor], generator: torch.Generator, train_actor: bool
    ) -> dict[str, float] | None:
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            w_next, logp_next, _ = self._draw(b["next_cond"], generator)
            q_next = self.q_target(b["next_cond"], b["next_elapsed"], w_next).min(0).values
            target = b["reward"] + self.gamma * (1 - b["done"]) * (q_next - alpha * logp_next)
        q = self.q(b["cond"], b["elapsed"], b["w"])  # (2, B)
        q_loss = 0.5 * (q - target).pow(2).sum(0).mean()
        if not self._optimize(q_loss, self.q_opt, self.q.parameters()):
            return None
        stats = {"q_loss": float(q_loss.detach()), "q_mean": float(q.detach().mean())}
        if train_actor:
            w, logp, std = self._draw(b["cond"], generator)
            q_pi = self.q(b["cond"], b["elapsed"], w).min(0).values
            actor_loss = (alpha * logp - q_pi).mean()
            if not self._optimize(actor_loss, self.actor_opt, self.noise_policy.parameters()):
                return None
            alpha_loss = -(self.log_alpha * (logp.detach().mean() + self.target_entropy))
            self._optimize(alpha_loss, self.alpha_opt, [self.log_alpha])
            stats.update(
                actor_loss=float(actor_loss.detach()),
                alpha=float(alpha),
                entropy=float(-logp.detach().mean()),
                log_std=float(std.detach().log().mean()),
            )
        with torch.no_grad():
            for p, p_target in zip(self.q.parameters(), self.q_target.parameters(), strict=True):
                p_target.lerp_(p, self.cfg.tau)
        return stats

    def _optimize(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params) -> bool:
        """A guarded step: skipped (False) when the loss or the gradient norm is not finite."""
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log.warning("SAC: non-finite loss; step skipped")
            return False
        loss.backward()
        norm = nn.utils.clip_grad_norm_(list(params), self.cfg.max_grad_norm)
        if not torch.isfinite(norm):
            log.warning("SAC: non-finite gradient norm; step skipped")
            opt.zero_grad(set_to_none=True)
            return False
        opt.step()
        return True

    def state_dict(self) -> dict[str, object]:
        """Everything but the actor and its optimizer (the fine-tuner saves those)."""
        return {
            "q": self.q.state_dict(),
            "q_target": self.q_target.state_dict(),
            "q_opt": self.q_opt.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.q.load_state_dict(state["q"])
        self.q_target.load_state_dict(state["q_target"])
        self.q_opt.load_state_dict(state["q_opt"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        if state["buffer"] is not None:
            data = state["buffer"]["data"]
            self.buffer = ReplayBuffer(
                self.cfg.buffer_size,
                tuple(data["cond"].shape[1:]),
                tuple(self.noise_policy.shape),
                self.noise_policy.log_std.device,
            )
            self.buffer.load_state_dict(state["buffer"])
