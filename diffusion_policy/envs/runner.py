"""Scores any policy with ``predict_action`` by rollouts in vectorized environments.

The defaults are the paper's Push-T protocol: 50 test episodes with seeds 100000..100049 and 6
train episodes with seeds 0..5 (logged separately), at most 300 steps, the policy seeing the last
2 observations and its 8 actions executed one by one. An episode's score is its maximum reward,
its success whether ``info["is_success"]`` was ever true.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from diffusion_policy.envs.pusht_env import OBS_TYPES, make_pusht_env
from diffusion_policy.envs.video import FrameRecorder, write_video

log = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async")


class Policy(Protocol):
    """What the runner needs of a policy."""

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps observations {key: (B, To, ...)} to ``{"action": (B, Ta, Da), ...}``."""
        ...


@dataclass
class EpisodeResult:
    """The outcome of one rollout episode."""

    seed: int
    split: str
    score: float = 0.0
    success: bool = False
    steps: int = 0


def _recorded(env_fn: Callable[[], gym.Env]) -> gym.Env:
    return FrameRecorder(env_fn())


class EnvRunner:
    """Evaluates a policy on episodes of an environment, in waves of ``n_envs`` parallel envs.

    Observations reach the policy as float32 tensors on its device, ``(B, To, *obs_shape)`` per
    key (a non-dict observation under the key ``"obs"``), the last ``n_obs_steps`` frames with
    the first one repeated after a reset. The first ``n_action_steps`` of the returned
    ``"action"`` (B, Ta, Da) are executed one by one. An env whose episode ended is masked: the
    vector env keeps stepping (and autoresetting) it, its results are ignored.

    Args:
        env_fn: Builds one environment (picklable for ``vectorization="async"``). Its ``info``
            should carry ``is_success``; for videos its ``render()`` returns RGB frames.
        n_test: Test episodes, seeds ``test_start_seed ..``.
        test_start_seed: Seed of the first test episode.
        n_train: Train episodes, seeds ``train_start_seed ..``, logged as ``train/*``.
        train_start_seed: Seed of the first train episode.
        max_steps: Env steps per episode at most.
        n_obs_steps: Observation frames given to the policy (To).
        n_action_steps: Actions executed per policy call.
        n_envs: Parallel envs per wave; None runs every episode in one wave (best policy
            batching with ``"sync"``).
        vectorization: ``"sync"`` (one process) or ``"async"`` (a process per env).
        n_videos: Record the first this many test episodes as MP4 in ``output_dir``.
        output_dir: Folder for the videos; needed when ``n_videos > 0``.
        fps: Video frame rate.
        device: Where observations go; inferred from the policy's parameters if None.
        progress: Show a tqdm bar over env steps.
    """

    def __init__(
        self,
        env_fn: Callable[[], gym.Env],
        n_test: int = 50,
        test_start_seed: int = 100000,
        n_train: int = 6,
        train_start_seed: int = 0,
        max_steps: int = 300,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        n_envs: int | None = None,
        vectorization: str = "sync",
        n_videos: int = 0,
        output_dir: str | Path | None = None,
        fps: int = 10,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        if n_test < 0 or n_train < 0 or n_test + n_train == 0:
            raise ValueError(f"n_test={n_test} and n_train={n_train} must be >= 0, not both 0")
        for name, value in [("max_steps", max_steps), ("n_obs_steps", n_obs_steps)]:
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps={n_action_steps} must be >= 1")
        if n_envs is not None and n_envs < 1:
            raise ValueError(f"n_envs={n_envs} must be >= 1 or None")
        if vectorization not in VECTORIZATIONS:
            raise ValueError(f"vectorization={vectorization!r} must be one of {VECTORIZATIONS}")
        if not 0 <= n_videos <= n_test:
            raise ValueError(f"n_videos={n_videos} must be in [0, n_test={n_test}]")
        if n_videos > 0 and output_dir is None:
            raise ValueError(f"n_videos={n_videos} needs an output_dir for the MP4 files")
        self.env_fn = env_fn
        self.seeds = [("test", test_start_seed + i) for i in range(n_test)]
        self.seeds += [("train", train_start_seed + i) for i in range(n_train)]
        self.max_steps = max_steps
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.n_envs = min(n_envs or len(self.seeds), len(self.seeds))
        self.vectorization = vectorization
        self.n_videos = n_videos
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.fps = fps
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self._n_runs = 0

    # -- public -----------------------------------------------------------------------------
    def run(self, policy: Policy) -> dict[str, Any]:
        """Rolls out every episode and summarizes them.

        Args:
            policy: Any object with ``predict_action``; an ``nn.Module`` is put in eval mode for
                the run and restored afterwards.

        Returns:
            ``"{split}/mean_score"`` and ``"{split}/success_rate"`` for each split with
            episodes, ``"per_episode"`` (dicts of :class:`EpisodeResult`), ``"videos"`` (MP4
            paths), and ``"time/*"`` seconds.
        """
        self._n_runs += 1
        device = self._policy_device(policy)
        was_training = policy.training if isinstance(policy, nn.Module) else None
        if isinstance(policy, nn.Module):
            policy.eval()
        episodes = [EpisodeResult(seed=seed, split=split) for split, seed in self.seeds]
        n_waves = -(-len(episodes) // self.n_envs)
        timer = {"policy": 0.0, "env": 0.0, "env_steps": 0}
        videos: list[str] = []
        start = time.perf_counter()
        envs = self._make_envs()
        bar = tqdm(
            total=n_waves * self.max_steps,
            desc="rollout",
            unit="step",
            leave=False,
            disable=not self.progress,
        )
        try:
            for i in range(0, len(episodes), self.n_envs):
                wave = episodes[i : i + self.n_envs]
                n_record = max(0, min(self.n_videos - i, len(wave)))
                frames = self._run_wave(envs, policy, device, wave, n_record, bar, timer)
                videos += self._write_videos(wave, frames)
        finally:
            bar.close()
            envs.close()
            if was_training:
                policy.train()
        timer["total"] = time.perf_counter() - start
        return self._summarize(episodes, videos, timer)

    # -- rollout ----------------------------------------------------------------------------
    def _make_envs(self) -> gym.vector.VectorEnv:
        env_fn = partial(_recorded, self.env_fn) if self.n_videos > 0 else self.env_fn
        fns = [env_fn] * self.n_envs
        if self.vectorization == "async":
            return gym.vector.AsyncVectorEnv(fns)
        return gym.vector.SyncVectorEnv(fns)

    def _run_wave(
        self,
        envs: gym.vector.VectorEnv,
        policy: Policy,
        device: torch.device,
        wave: list[EpisodeResult],
        n_record: int,
        bar: tqdm,
        timer: dict[str, float],
    ) -> list[list[np.ndarray]]:
        """Runs one episode per env (padding envs repeat the last seed, masked from the start)."""
        n_envs, n = envs.num_envs, len(wave)
        seeds = [ep.seed for ep in wave] + [wave[-1].seed] * (n_envs - n)
        recording = np.arange(n_envs) < n_record  # (N,)
        if n_record:
            envs.set_attr("recording", recording.tolist())
        obs, _ = envs.reset(seed=seeds)
        history = deque([obs] * self.n_obs_steps, maxlen=self.n_obs_steps)
        done = np.arange(n_envs) >= n  # (N,)
        step = 0
        while step < self.max_steps and not done.all():
            tic = time.perf_counter()
            actions = self._predict(policy, history, device, envs)  # (N, Ta, Da)
            timer["policy"] += time.perf_counter() - tic
            for action in actions.swapaxes(0, 1)[: self.n_action_steps]:  # (N, Da) each
                tic = time.perf_counter()
                obs, reward, terminated, truncated, info = envs.step(action)
                timer["env"] += time.perf_counter() - tic
                timer["env_steps"] += n_envs
                history.append(obs)
                success = info.get("is_success", np.zeros(n_envs, dtype=bool))
                for j in np.flatnonzero(~done):
                    ep = wave[j]
                    ep.score = max(ep.score, float(reward[j]))
                    ep.success = ep.success or bool(success[j])
                    ep.steps += 1
                ended = ~done & (terminated | truncated)  # (N,)
                done |= ended
                step += 1
                bar.update(1)
                if (ended & recording).any():  # stop before the autoreset adds frames
                    recording &= ~ended
                    envs.set_attr("recording", recording.tolist())
                if step >= self.max_steps or done.all():
                    break
        bar.update(self.max_steps - step)
        if not n_record:
            return []
        frames = list(envs.call("pop_frames"))[:n_record]
        envs.set_attr("recording", [False] * n_envs)
        return frames

    def _predict(
        self,
        policy: Policy,
        history: deque,
        device: torch.device,
        envs: gym.vector.VectorEnv,
    ) -> np.ndarray:
        frames = [h if isinstance(h, dict) else {"obs": h} for h in history]
        obs = {
            key: torch.from_numpy(
                np.stack([f[key] for f in frames], axis=1).astype(np.float32)  # (N, To, ...)
            ).to(device)
            for key in frames[-1]
        }
        with torch.no_grad():
            out = policy.predict_action(obs)
        if "action" not in out:
            raise KeyError(f"predict_action must return an 'action' entry, got keys {list(out)}")
        action = out["action"]
        action_dim = envs.single_action_space.shape[0]
        if action.ndim != 3 or action.shape[0] != envs.num_envs or action.shape[2] != action_dim:
            raise ValueError(
                f"predict_action returned action of shape {tuple(action.shape)}, expected "
                f"({envs.num_envs}, Ta, {action_dim})"
            )
        return action.detach().float().cpu().numpy()

    # -- helpers ----------------------------------------------------------------------------
    def _policy_device(self, policy: Policy) -> torch.device:
        if self.device is not None:
            return self.device
        if isinstance(policy, nn.Module):
            param = next(policy.parameters(), None)
            if param is not None:
                return param.device
        device = getattr(policy, "device", None)
        return torch.device(device) if device is not None else torch.device("cpu")

    def _write_videos(self, wave: list[EpisodeResult], frames: list[list[np.ndarray]]) -> list[str]:
        paths = []
        for ep, ep_frames in zip(wave, frames, strict=False):
            name = f"rollout{self._n_runs:03d}_{ep.split}_seed{ep.seed}.mp4"
            paths.append(str(write_video(self.output_dir / name, ep_frames, fps=self.fps)))
        return paths

    def _summarize(
        self, episodes: list[EpisodeResult], videos: list[str], timer: dict[str, float]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for split in ("test", "train"):
            eps = [ep for ep in episodes if ep.split == split]
            if eps:
                result[f"{split}/mean_score"] = float(np.mean([ep.score for ep in eps]))
                result[f"{split}/success_rate"] = float(np.mean([ep.success for ep in eps]))
        result["time/total_s"] = timer["total"]
        result["time/policy_s"] = timer["policy"]
        result["time/env_s"] = timer["env"]
        result["time/env_steps_per_s"] = timer["env_steps"] / max(timer["env"], 1e-9)
        result["per_episode"] = [asdict(ep) for ep in episodes]
        result["videos"] = videos
        log.info(
            "rollout: %s in %.1fs (policy %.1fs, env %.1fs)",
            ", ".join(f"{k}={v:.3f}" for k, v in result.items() if "/" in k and "time" not in k),
            timer["total"],
            timer["policy"],
            timer["env"],
        )
        return result


class PushTRunner(EnvRunner):
    """:class:`EnvRunner` on :class:`~diffusion_policy.envs.pusht_env.PushTEnv`.

    Args:
        obs_type: ``"keypoint"`` or ``"image"``.
        render_size: Side in pixels of video frames.
        image_size: Side in pixels of image observations.
        **kwargs: :class:`EnvRunner` arguments (episode counts, seeds, n_envs, videos...).
    """

    def __init__(
        self,
        obs_type: str = "keypoint",
        render_size: int = 96,
        image_size: int = 96,
        **kwargs: Any,
    ) -> None:
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type={obs_type!r} must be one of {OBS_TYPES}")
        env_fn = partial(
            make_pusht_env, obs_type=obs_type, render_size=render_size, image_size=image_size
        )
        super().__init__(env_fn=env_fn, **kwargs)
