"""ChunkEnv: one step is one decision; rewards summed; success pays the rest of the episode.
collect: only running episodes are sampled and simulated."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.rollouts import ChunkEnv, collect, make_chunk_envs
from diffusion_policy.rl.steering import NoiseSteering


class CountingEnv(gym.Env):
    """Observes its step count; reward 0.5 per step; succeeds (terminates) at step 3."""

    observation_space = spaces.Dict({"t": spaces.Box(0, 100, (1,), np.float32)})
    action_space = spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self.t = 0
        return {"t": np.array([0.0], np.float32)}, {}

    def step(self, action):
        self.t += 1
        success = self.t == 3
        obs = {"t": np.array([self.t], np.float32)}
        return obs, 0.5, success, False, {"is_success": success}


def test_chunk_stops_at_success_and_fills_the_remaining_steps():
    env = ChunkEnv(CountingEnv(), n_obs_steps=2, n_action_steps=4, max_steps=10)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs["t"], [[0.0], [0.0]])  # the first frame repeated
    assert info["elapsed"] == 0.0
    obs, reward, terminated, truncated, info = env.step(np.zeros((8, 2)))
    np.testing.assert_array_equal(obs["t"], [[2.0], [3.0]])  # stopped after step 3 of 4
    assert terminated and not truncated
    assert reward == pytest.approx(0.5 * 3 + 0.5 * 7)  # 7 steps left to max_steps
    assert info["episode_success"] == 1.0
    assert info["chunk_steps"] == 3
    assert info["elapsed"] == pytest.approx(0.3)  # 3 of 10 steps spent
    assert info["episode_return"] == pytest.approx(1.5)  # the env's own rewards


def test_chunk_truncates_at_max_steps_without_fill():
    env = ChunkEnv(CountingEnv(), 1, 2, max_steps=2, success_bonus=1.0, fill_after_success=False)
    env.reset()
    _, reward, terminated, truncated, _ = env.step(np.zeros((2, 2)))
    assert (reward, terminated, truncated) == (1.0, False, True)


def test_vector_of_chunk_envs_batches_histories():
    envs = make_chunk_envs(CountingEnv, 3, n_obs_steps=2, n_action_steps=2, max_steps=10)
    obs, info = envs.reset(seed=[0, 1, 2])
    assert obs["t"].shape == (3, 2, 1)
    np.testing.assert_allclose(info["elapsed"], [0.0, 0.0, 0.0])
    obs, reward, *_, info = envs.step(np.zeros((3, 2, 2)))
    np.testing.assert_allclose(reward, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(info["elapsed"], [0.2, 0.2, 0.2])
    envs.close()


def test_idle_env_does_not_simulate():
    envs = make_chunk_envs(CountingEnv, 2, n_obs_steps=1, n_action_steps=2, max_steps=10)
    envs.reset(seed=[0, 1])
    envs.set_attr("idle", [False, True])
    obs, reward, terminated, truncated, info = envs.step(np.zeros((2, 2, 2)))
    np.testing.assert_array_equal(obs["t"][:, -1, 0], [2.0, 0.0])  # env 1 took no step
    np.testing.assert_allclose(reward, [1.0, 0.0])
    np.testing.assert_array_equal(info["chunk_steps"], [2, 0])
    assert not terminated.any() and not truncated.any()
    envs.close()


class EndsBySeedEnv(gym.Env):
    """Push-T-shaped observations; the episode seeded ``s`` succeeds at its step ``s``."""

    observation_space = spaces.Dict(
        {
            "keypoint": spaces.Box(0, 512, (18,), np.float32),
            "agent_pos": spaces.Box(0, 512, (2,), np.float32),
        }
    )
    action_space = spaces.Box(0, 512, (2,), np.float32)
    simulated = 0  # steps taken by all instances

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.end, self.t = seed or 1, 0
        return self.observation_space.sample(), {}

    def step(self, action):
        EndsBySeedEnv.simulated += 1
        self.t += 1
        success = self.t == self.end
        return self.observation_space.sample(), 1.0, success, False, {"is_success": success}


def test_collect_samples_and_simulates_only_running_episodes(tiny_policy):
    cond_dim = tiny_policy.n_obs_steps * tiny_policy.encoder.output_dim
    tiny_policy.noise_policy = NoisePolicy(cond_dim, tiny_policy.horizon, 2, [16])
    steering = NoiseSteering(tiny_policy)
    batch_sizes = []
    sample = steering.sample
    steering.sample = lambda cond, *a: batch_sizes.append(len(cond)) or sample(cond, *a)
    envs = make_chunk_envs(EndsBySeedEnv, 3, n_obs_steps=2, n_action_steps=4, max_steps=20)
    critic = ValueMLP(cond_dim, [16])
    EndsBySeedEnv.simulated = 0
    # Episodes of 2, 8 and 15 steps: 1, 2 and 4 decisions of 4 steps.
    rollout = collect(envs, steering, critic, [2, 8, 15], 5, torch.Generator().manual_seed(0))
    assert batch_sizes == [3, 2, 1, 1]
    torch.testing.assert_close(rollout.valid.sum(0), torch.tensor([1, 2, 4]))
    assert rollout.env_steps == EndsBySeedEnv.simulated == 2 + 8 + 15
    assert rollout.episodes["success"] == [1.0, 1.0, 1.0]
    assert (rollout.log_probs[~rollout.valid] == 0).all()
    envs.close()
