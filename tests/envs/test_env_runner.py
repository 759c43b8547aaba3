"""EnvRunner / PushTRunner with scripted policies: seeds, masking, scores, devices, videos."""

from __future__ import annotations

import errno
import logging

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from diffusion_policy.envs import video
from diffusion_policy.envs.pusht_env import make_pusht_env
from diffusion_policy.envs.runner import EnvRunner, PushTRunner


class HoldPolicy:
    """A plain class: keeps the agent where it is, checking the observations it gets."""

    def __init__(self, n_action_steps: int = 8):
        self.n_action_steps = n_action_steps
        self.calls: list[dict[str, torch.Tensor]] = []

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert not torch.is_grad_enabled()
        self.calls.append(obs)
        pos = obs["agent_pos"][:, -1:]  # (B, 1, 2)
        return {"action": pos.repeat(1, self.n_action_steps, 1)}  # (B, Ta, 2)


def test_pusht_runner_records_seeds_and_scores():
    policy = HoldPolicy()
    runner = PushTRunner(n_test=3, n_train=2, n_envs=2, max_steps=12, progress=False)
    result = runner.run(policy)

    eps = result["per_episode"]
    assert [(e["split"], e["seed"]) for e in eps] == [
        ("test", 100000),
        ("test", 100001),
        ("test", 100002),
        ("train", 0),
        ("train", 1),
    ]
    assert all(0.0 <= e["score"] <= 1.0 and e["steps"] == 12 for e in eps)
    assert result["test/mean_score"] == pytest.approx(np.mean([e["score"] for e in eps[:3]]))
    assert result["train/mean_score"] == pytest.approx(np.mean([e["score"] for e in eps[3:]]))
    assert result["test/success_rate"] == 0.0 and result["videos"] == []
    # 3 waves of 2 envs, ceil(12 / 8) = 2 calls each; obs (B, To, D) float32, reset repeated.
    assert len(policy.calls) == 6
    first = policy.calls[0]
    assert first["keypoint"].shape == (2, 2, 18) and first["agent_pos"].shape == (2, 2, 2)
    assert first["keypoint"].dtype == torch.float32
    torch.testing.assert_close(first["keypoint"][:, 0], first["keypoint"][:, 1])

    # The same episode run by hand gives the same score.
    env = make_pusht_env()
    obs, _ = env.reset(seed=100001)
    rewards = [env.step(obs["agent_pos"])[1] for _ in range(12)]
    assert eps[1]["score"] == pytest.approx(max(rewards))


class CountdownEnv(gym.Env):
    """Terminates (success) after ``seed % 4 + 1`` steps; reward = steps taken / 10."""

    observation_space = spaces.Box(-1e3, 1e3, shape=(3,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = (seed if seed is not None else 99) % 4 + 1
        self.t = 0
        return np.full(3, self.t, dtype=np.float32), {"is_success": False}

    def step(self, action):
        self.t += 1
        self.left -= 1
        obs = np.full(3, self.t, dtype=np.float32)
        return obs, self.t / 10, self.left == 0, False, {"is_success": self.left == 0}

    def render(self):
        return np.full((16, 16, 3), 20 * self.t, dtype=np.uint8)


class ZeroModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert not self.training and obs["obs"].device == self.scale.device
        self.seen_shape = tuple(obs["obs"].shape)
        return {"action": torch.zeros(obs["obs"].shape[0], 2, 2) * self.scale}


def test_runner_masks_ended_episodes_and_restores_module_mode():
    policy = ZeroModule().train()
    runner = EnvRunner(
        CountdownEnv, n_test=5, test_start_seed=0, n_train=0, n_envs=3, max_steps=10,
        n_obs_steps=3, n_action_steps=2, progress=False,
    )  # fmt: skip
    result = runner.run(policy)
    steps = [e["steps"] for e in result["per_episode"]]
    assert policy.seen_shape == (3, 3, 3)  # (B, To, D)
    assert steps == [1, 2, 3, 4, 1]
    # Rewards after an episode ended (the vector env's autoreset) are ignored.
    assert [e["score"] for e in result["per_episode"]] == pytest.approx([s / 10 for s in steps])
    assert result["test/success_rate"] == 1.0 and "train/mean_score" not in result
    assert policy.training


def test_runner_rejects_bad_actions_and_arguments():
    class BadPolicy:
        def predict_action(self, obs):
            return {"action": torch.zeros(obs["agent_pos"].shape[0], 8, 3)}

    runner = PushTRunner(n_test=1, n_train=0, max_steps=4, progress=False)
    with pytest.raises(ValueError, match=r"\(1, 8, 3\)"):
        runner.run(BadPolicy())
    with pytest.raises(ValueError, match="n_videos=2"):
        PushTRunner(n_test=1, n_videos=2, output_dir="x")
    with pytest.raises(ValueError, match="vectorization='threads'"):
        PushTRunner(vectorization="threads")


def test_runner_replans_and_ensembles_as_the_controller():
    class CountingPolicy:
        calls = rows = 0

        def predict_action(self, obs):
            self.calls += 1
            self.rows += obs["obs"].shape[0]
            chunk = torch.zeros(obs["obs"].shape[0], 4, 2)
            return {"action": chunk, "action_pred": torch.cat([chunk, chunk], dim=1)}

    kwargs = dict(n_test=1, test_start_seed=3, n_train=0, max_steps=10, progress=False)
    policy = CountingPolicy()
    EnvRunner(CountdownEnv, n_action_steps=4, **kwargs).run(policy)
    assert policy.calls == 1  # the episode's 4 steps: one chunk
    policy = CountingPolicy()
    EnvRunner(CountdownEnv, n_action_steps=4, replan_at=3, ensemble_decay=0.0, **kwargs).run(policy)
    assert policy.calls == 4  # a plan every step
    policy = CountingPolicy()
    EnvRunner(CountdownEnv, n_action_steps=4, coherence_samples=3, **kwargs).run(policy)
    assert (policy.calls, policy.rows) == (1, 3)  # one plan of 3 samples for the one env
    with pytest.raises(ValueError, match="replan_at=4"):
        EnvRunner(CountdownEnv, n_action_steps=4, replan_at=4)
    with pytest.raises(ValueError, match="ensemble_decay=0.1"):
        EnvRunner(CountdownEnv, n_action_steps=4, ensemble_decay=0.1)
    with pytest.raises(ValueError, match="coherence_samples=0"):
        EnvRunner(CountdownEnv, n_action_steps=4, coherence_samples=0)


def test_async_matches_sync():
    kwargs = dict(n_test=2, n_train=1, n_envs=2, max_steps=9, progress=False)
    sync = PushTRunner(**kwargs).run(HoldPolicy())
    asyn = PushTRunner(vectorization="async", **kwargs).run(HoldPolicy())
    assert asyn["per_episode"] == sync["per_episode"]


def test_video_is_written_and_decodes(tmp_path):
    runner = PushTRunner(
        n_test=2, n_train=0, max_steps=16, n_videos=1, output_dir=tmp_path, render_size=128,
        progress=False,
    )  # fmt: skip
    result = runner.run(HoldPolicy())
    assert len(result["videos"]) == 1
    frames = iio.imread(result["videos"][0], plugin="pyav")  # (T, H, W, 3)
    assert frames.shape == (17, 128, 128, 3)  # the reset frame + one per step
    assert frames.std() > 10  # a scene, not a blank frame


def test_video_stops_when_its_episode_ends(tmp_path):
    runner = EnvRunner(
        CountdownEnv, n_test=3, test_start_seed=1, n_train=0, max_steps=10, n_action_steps=1,
        n_videos=2, output_dir=tmp_path, progress=False,
    )  # fmt: skip
    result = runner.run(ZeroModule())
    assert [e["steps"] for e in result["per_episode"]] == [2, 3, 4]
    lengths = [len(iio.imread(path, plugin="pyav")) for path in result["videos"]]
    assert lengths == [3, 4]  # no frames from the autoreset after the episode ended


def test_video_on_a_full_disk_is_logged_and_left_out(tmp_path, monkeypatch, caplog):
    """A full disk while writing a video used to raise out of the runner (and training)."""
    imwrite = video.iio.imwrite

    def full_disk_for_seed2(path, *args, **kwargs):
        if "seed2" not in str(path):
            return imwrite(path, *args, **kwargs)
        path.write_bytes(b"half a video")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(video.iio, "imwrite", full_disk_for_seed2)
    runner = EnvRunner(
        CountdownEnv, n_test=3, test_start_seed=1, n_train=0, max_steps=10, n_action_steps=1,
        n_videos=2, output_dir=tmp_path, progress=False,
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="diffusion_policy.envs.runner"):
        result = runner.run(ZeroModule())
    assert [e["steps"] for e in result["per_episode"]] == [2, 3, 4]  # scores still reported
    assert result["test/success_rate"] == 1.0 and result["test/n_failed"] == 0
    assert [p.rsplit("_", 1)[-1] for p in result["videos"]] == ["seed1.mp4"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "seed 2" in errors[0] and "No space left on device" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout001_test_seed1.mp4"]
