"""Rollouts for RL fine-tuning: one vector-env step is one decision (an executed action chunk).

:class:`ChunkEnv` wraps an environment so that its observation is the last ``n_obs_steps``
frames (the first one repeated after a reset, as the policy was trained) and its action is a
chunk whose first ``n_action_steps`` actions it executes, stopping early when the episode ends.
A gymnasium ``SyncVectorEnv`` of them runs the envs in lockstep, and :func:`collect` samples the
policy's stochastic denoising chain batched across the envs, one episode per env and iteration.
An env whose episode has ended is set ``idle``: it no longer simulates, and the policy no longer
samples for it, so an iteration costs what its episodes do, not ``n_envs * max_steps``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from diffusion_policy.rl.chain import DenoisingChain
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.steering import NoiseSteering


class ChunkEnv(gym.Wrapper):
    """Executes action chunks; observes a history of frames; ends episodes at ``max_steps``.

    The decision's reward is the sum of the executed steps' rewards. An episode that ends
    successfully (``info["is_success"]``) gets ``success_bonus`` and, with
    ``fill_after_success``, the last step's reward for each step left to ``max_steps``: without
    it, Push-T (which terminates on success) would pay more for hovering just below the success
    threshold than for succeeding early.

    Args:
        env: The environment, with a ``Dict`` observation space and a ``Box`` action space.
        n_obs_steps: Frames of observation history (To).
        n_action_steps: Actions executed per decision (Ta).
        max_steps: Env steps per episode at most (then truncated).
        success_bonus: Added to the reward of the decision that succeeds.
        fill_after_success: Pay the remaining steps' rewards on success.

    Attributes:
        idle: While True (set through the vector env's ``set_attr``), :meth:`step` simulates
            nothing: it returns the last observation, reward 0 and ``chunk_steps`` 0. For envs
            whose episode has ended and whose results are ignored.
    """

    def __init__(
        self,
        env: gym.Env,
        n_obs_steps: int,
        n_action_steps: int,
        max_steps: int,
        success_bonus: float = 0.0,
        fill_after_success: bool = True,
    ) -> None:
        super().__init__(env)
        if not isinstance(env.observation_space, spaces.Dict):
            space = env.observation_space
            raise ValueError(f"ChunkEnv needs a Dict observation space, got {space}")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.max_steps = max_steps
        self.success_bonus = success_bonus
        self.fill_after_success = fill_after_success
        self.observation_space = spaces.Dict(
            {
                k: spaces.Box(
                    low=np.repeat(s.low[None], n_obs_steps, 0),
                    high=np.repeat(s.high[None], n_obs_steps, 0),
                    dtype=s.dtype,
                )
                for k, s in env.observation_space.spaces.items()
            }
        )
        act = env.action_space
        self.action_space = spaces.Box(
            low=np.repeat(act.low[None], n_action_steps, 0),
            high=np.repeat(act.high[None], n_action_steps, 0),
            dtype=act.dtype,
        )  # (Ta, Da)
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)
        self._steps = 0
        self._episode: dict[str, float] = {}
        self.idle = False

    def _stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack([o[k] for o in self._history]) for k in self._history[0]}  # (To, ..)

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._history.clear()
        self._history.extend([obs] * self.n_obs_steps)
        self._steps = 0
        self._episode = {"episode_return": 0.0, "episode_score": 0.0, "episode_success": 0.0}
        return self._stacked(), {**info, **self._episode, "elapsed": 0.0}

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Executes ``action[:n_action_steps]`` (Ta, Da), stopping when the episode ends."""
        if self.idle:
            info = {**self._episode, "chunk_steps": 0, "elapsed": self._steps / self.max_steps}
            return self._stacked(), 0.0, False, False, info
        reward, terminated, truncated, info = 0.0, False, False, {}
        success, start = False, self._steps
        for a in np.asarray(action)[: self.n_action_steps]:
            obs, r, terminated, truncated, info = self.env.step(a)
            self._history.append(obs)
            self._steps += 1
            reward += float(r)
            self._episode["episode_return"] += float(r)
            self._episode["episode_score"] = max(self._episode["episode_score"], float(r))
            success = success or bool(info.get("is_success", False))
            truncated = truncated or self._steps >= self.max_steps
            if terminated or truncated:
                break
        if success:
            self._episode["episode_success"] = 1.0
            reward += self.success_bonus
            if self.fill_after_success and terminated:
                reward += float(r) * (self.max_steps - self._steps)
        info = {
            **info,
            **self._episode,
            "chunk_steps": self._steps - start,
            "elapsed": self._steps / self.max_steps,
        }
        return self._stacked(), reward, terminated, truncated, info


@dataclass
class Rollout:
    """What :func:`collect` gathers over N decisions in E envs (rows after an episode's end are
    invalid: ``valid`` is False there).

    Attributes:
        cond: Observation features of each decision (N, E, To, F).
        elapsed: The fraction of the episode's step budget spent before it (N, E).
        samples: Fine-tuned chain steps x_K..x_0 (N, E, K + 1, T, Da).
        log_probs: Their log-densities when sampled (N, E, K).
        values: The critic's values (N, E).
        rewards: Decision rewards (N, E).
        dones: Whether the episode ended with the decision (N, E).
        valid: Whether the decision belongs to the env's episode (N, E).
        last_values: Values after the last decision (E,).
        episodes: Per-episode ``return``, ``score`` (max reward) and ``success``.
        env_steps: Env steps taken by valid decisions.
    """

    cond: torch.Tensor
    elapsed: torch.Tensor
    samples: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    valid: torch.Tensor
    last_values: torch.Tensor
    episodes: dict[str, list[float]] = field(default_factory=dict)
    env_steps: int = 0


def make_chunk_envs(
    env_fn: Any, n_envs: int, n_obs_steps: int, n_action_steps: int, max_steps: int, **kwargs: Any
) -> gym.vector.SyncVectorEnv:
    """A ``SyncVectorEnv`` of ``n_envs`` :class:`ChunkEnv` around ``env_fn()``."""
    if n_envs < 1:
        raise ValueError(f"n_envs={n_envs} must be >= 1")

    def make() -> gym.Env:
        return ChunkEnv(env_fn(), n_obs_steps, n_action_steps, max_steps, **kwargs)

    return gym.vector.SyncVectorEnv([make] * n_envs)


def _to_tensors(obs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Vector observations {key: (E, To, ...)} as tensors; uint8 (images) kept, rest float32."""
    out = {}
    for k, v in obs.items():
        t = torch.as_tensor(np.asarray(v))
        out[k] = (t if t.dtype == torch.uint8 else t.float()).to(device)
    return out


def _elapsed(info: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Each env's spent fraction of its step budget (E,), from the vector env's info."""
    return torch.as_tensor(np.asarray(info["elapsed"]), dtype=torch.float32, device=device)


@torch.no_grad()
def collect(
    envs: gym.vector.VectorEnv,
    chain: DenoisingChain | NoiseSteering,
    critic: ValueMLP,
    seeds: list[int],
    n_decisions: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Runs one episode per env (seeded ``seeds``) for at most ``n_decisions`` decisions.

    Args:
        envs: A vector env of :class:`ChunkEnv`.
        chain: Samples the actions (its policy encodes the observations).
        critic: Values the observations.
        seeds: One episode seed per env.
        n_decisions: Decisions per episode at most (``ceil(max_steps / n_action_steps)``).
        generator: Random generator of the chain's noise, for reproducible rollouts.

    Returns:
        The :class:`Rollout`.
    """
    policy = chain.policy
    device = next(policy.parameters()).device
    start = policy.n_obs_steps - 1  # the chunk starts at the last observed step
    obs, info = envs.reset(seed=list(seeds))
    E = envs.num_envs
    envs.set_attr("idle", [False] * E)
    alive = np.ones(E, dtype=bool)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("cond", "elapsed", "samples")}
    rows["log_probs"] = []
    rows.update(values=[], rewards=[], dones=[], valid=[])
    episodes: dict[str, list[float]] = {"return": [], "score": [], "success": []}
    env_steps = 0
    obs_t = _to_tensors(obs, device)
    cond = policy.encode_obs(obs_t)  # (E, To, F)
    elapsed = _elapsed(info, device)  # (E,)
    for _ in range(n_decisions):
        # Only the envs whose episode goes on are sampled; the rows of the others stay zero.
        live = torch.as_tensor(np.flatnonzero(alive), device=device)  # (A,)
        offset = policy.action_offset(obs_t)
        sample = chain.sample(cond[live], generator, None if offset is None else offset[live])
        samples = sample.samples.new_zeros((E, *sample.samples.shape[1:]))  # (E, K + 1, T, Da)
        samples[live] = sample.samples
        log_probs = sample.log_probs.new_zeros((E, sample.log_probs.shape[1]))  # (E, K)
        log_probs[live] = sample.log_probs
        chunk = np.zeros((E, policy.n_action_steps, sample.action.shape[-1]), np.float32)
        chunk[alive] = sample.action[:, start : start + policy.n_action_steps].cpu().numpy()
        obs, reward, terminated, truncated, info = envs.step(chunk)  # idle envs ignore theirs
        done = terminated | truncated
        rows["cond"].append(cond)
        rows["elapsed"].append(elapsed)
        rows["samples"].append(samples)
        rows["log_probs"].append(log_probs)
        rows["values"].append(critic(cond, elapsed))
        rows["rewards"].append(torch.as_tensor(reward, dtype=torch.float32, device=device))
        rows["dones"].append(torch.as_tensor(done, device=device))
        rows["valid"].append(torch.as_tensor(alive.copy(), device=device))
        env_steps += int(np.asarray(info["chunk_steps"])[alive].sum())
        for e in np.flatnonzero(done & alive):
            episodes["return"].append(float(info["episode_return"][e]))
            episodes["score"].append(float(info["episode_score"][e]))
            episodes["success"].append(float(info["episode_success"][e]))
        alive &= ~done
        envs.set_attr("idle", (~alive).tolist())
        obs_t = _to_tensors(obs, device)
        cond = policy.encode_obs(obs_t)
        elapsed = _elapsed(info, device)
        if not alive.any():
            break
    # Episodes cut by n_decisions (not ended) count with their scores so far.
    for e in np.flatnonzero(alive):
        episodes["return"].append(float(info["episode_return"][e]))
        episodes["score"].append(float(info["episode_score"][e]))
        episodes["success"].append(float(info["episode_success"][e]))
    stacked = {k: torch.stack(v) for k, v in rows.items()}
    return Rollout(
        **stacked,
        last_values=critic(cond, elapsed),
        episodes=episodes,
        env_steps=env_steps,
    )
