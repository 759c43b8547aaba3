"""Scores any policy with ``predict_action`` by rollouts in vectorized environments.

The defaults are the paper's Push-T protocol: 50 test episodes with seeds 100000..100049 and 6
train episodes with seeds 0..5 (logged separately), at most 300 steps, the policy seeing the last
2 observations and its 8 actions executed one by one.

Scoring is the task's: a :class:`~diffusion_policy.envs.scoring.Scorer` gets each episode's
per-step rewards and infos when it ends and returns its score, success and extra per-episode
values; at the end of a run it summarizes each split's episodes into extra metrics, logged as
``"{split}/{key}"``. Push-T's (the default) scores an episode by its maximum reward (the best
goal coverage) and counts it a success if ``info["is_success"]`` was ever true.

Failures never take the caller (e.g. a training run) down; a failed episode scores 0, has no
success and is counted in ``"{split}/n_failed"``, its ``error`` saying why:

- An env raising in ``reset``/``step`` fails its episode. This holds for any exception,
  ``SystemExit`` and ``GeneratorExit`` included, except ``KeyboardInterrupt``, which goes through
  (the user's Ctrl-C).
- A non-finite (NaN/inf) observation from an env, or action from the policy, fails its episode,
  naming the first bad value; the other episodes go on.
- With ``vectorization="async"``, a worker process that dies (even by a segfault), hangs past
  ``step_timeout_s`` or breaks the vector env otherwise fails its episode, and the other
  unfinished episodes of its wave run again in new envs.
- A video that cannot be written (e.g. a full disk) is logged as an error and left out; the
  episode's scores are kept.

With ``vectorization="sync"`` the envs run in the caller's process: an env that segfaults kills
the process (training included) and one that hangs blocks it. Use ``"async"`` to isolate
untrusted or crashy envs in worker processes. ``run`` raises only for configuration errors: the
envs cannot be built the first time, or the policy's output is malformed.

The policy is driven by :class:`~diffusion_policy.deploy.controller.BatchController`, the
controller a deployed robot uses (without its latency hiding: the rollout is deterministic).
With ``sampling_seed``, each wave's sampling noise is seeded from it and the wave's env seeds:
per-episode results reproduce (with ``n_envs=1``, whatever the other episodes), and a rollout
through the policy server draws the same noise.

This module is the rollout loop; fault handling is in :mod:`~diffusion_policy.envs.faults`, the
per-episode bookkeeping in :mod:`~diffusion_policy.envs.episodes`, the scoring rules in
:mod:`~diffusion_policy.envs.scoring`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from diffusion_policy.deploy.controller import BatchController, check_replanning
from diffusion_policy.envs import faults
from diffusion_policy.envs.episodes import EpisodeResult, Wave
from diffusion_policy.envs.pusht_env import OBS_TYPES, make_pusht_env
from diffusion_policy.envs.scoring import MaxRewardScorer, Scorer
from diffusion_policy.envs.video import FrameRecorder, write_video
from diffusion_policy.utils.checks import check_window

log = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async")
# Metrics the runner reports for every task; a scorer's summary may not reuse them.
RUNNER_METRICS = ("mean_score", "success_rate", "n_failed")


class Policy(Protocol):
    """What the runner needs of a policy."""

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps observations {key: (B, To, ...)} to ``{"action": (B, Ta, Da), ...}``."""
        ...


@dataclass
class _Stats:
    """Seconds spent and env steps taken in one ``run``, and its progress bar."""

    bar: tqdm
    seconds: dict[str, float] = field(default_factory=lambda: {"policy": 0.0, "env": 0.0})
    env_steps: int = 0

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        tic = time.perf_counter()
        yield
        self.seconds[what] += time.perf_counter() - tic


class EnvRunner:
    """Evaluates a policy on episodes of an environment, in waves of ``n_envs`` parallel envs.

    Observations reach the policy as tensors on its device, ``(B, To, *obs_shape)`` per key (a
    non-dict observation under the key ``"obs"``): float32, except uint8 ones (images, as the
    datasets hold them), which stay uint8. They are the last ``n_obs_steps`` frames, with
    the first one repeated after a reset. The first ``n_action_steps`` of the returned
    ``"action"`` (B, Ta, Da) are executed one by one. An env whose episode ended is masked: the
    vector env keeps stepping (and autoresetting) it, its results are ignored.

    Args:
        env_fn: Builds one environment (picklable for ``vectorization="async"``). For videos its
            ``render()`` returns RGB frames.
        n_test: Test episodes, seeds ``test_start_seed ..``.
        test_start_seed: Seed of the first test episode.
        n_train: Train episodes, seeds ``train_start_seed ..``, logged as ``train/*``.
        train_start_seed: Seed of the first train episode.
        max_steps: Env steps per episode at most.
        n_obs_steps: Observation frames given to the policy (To).
        n_action_steps: Actions executed per policy call.
        replan_at: Plan the next chunk when this many of the current one's actions remain
            (0: when it runs out); see :class:`~diffusion_policy.deploy.controller.BatchController`.
        ensemble_decay: Temporal ensembling of overlapping chunks (needs ``replan_at >= 1``);
            None executes the newest chunk's actions.
        coherence_samples: Chunks sampled per plan, the one that agrees best with the
            previous plan kept (backward coherence); 1 keeps every sample.
        n_envs: Parallel envs per wave; None runs every episode in one wave (best policy
            batching with ``"sync"``).
        vectorization: ``"sync"`` (one process) or ``"async"`` (a process per env).
        step_timeout_s: With ``"async"``, seconds a vector ``reset``/``step`` may take before
            the workers that have not answered count as hung (their episodes fail, the envs
            are replaced); None waits forever. A ``"sync"`` env runs in this process and
            cannot be timed out.
        n_videos: Record the first this many test episodes as MP4 in ``output_dir``.
        output_dir: Folder for the videos; needed when ``n_videos > 0``.
        fps: Video frame rate.
        device: Where observations go; inferred from the policy's parameters if None.
        progress: Show a tqdm bar over env steps.
        scorer: The task's scoring rule; None is :class:`MaxRewardScorer` (Push-T's: maximum
            reward, success if ``info["is_success"]`` was ever true).
        sampling_seed: Seeds the policy's sampling noise per wave (chunk ``j`` of a wave with
            env seeds ``s`` draws from ``(sampling_seed, *s, j)``); None leaves it to the
            policy's own random generator.
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
        replan_at: int = 0,
        ensemble_decay: float | None = None,
        coherence_samples: int = 1,
        n_envs: int | None = None,
        vectorization: str = "sync",
        step_timeout_s: float | None = 60.0,
        n_videos: int = 0,
        output_dir: str | Path | None = None,
        fps: int = 10,
        device: str | torch.device | None = None,
        progress: bool = True,
        scorer: Scorer | None = None,
        sampling_seed: int | None = None,
    ) -> None:
        if n_test < 0 or n_train < 0 or n_test + n_train == 0:
            raise ValueError(f"n_test={n_test} and n_train={n_train} must be >= 0, not both 0")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        check_window(None, n_obs_steps, n_action_steps)  # the policy has the horizon
        check_replanning(
            n_action_steps,
            replan_at,
            background=False,
            ensemble_decay=ensemble_decay,
            coherence_samples=coherence_samples,
        )
        if n_envs is not None and n_envs < 1:
            raise ValueError(f"n_envs={n_envs} must be >= 1 or None")
        if vectorization not in VECTORIZATIONS:
            raise ValueError(f"vectorization={vectorization!r} must be one of {VECTORIZATIONS}")
        if step_timeout_s is not None and not step_timeout_s > 0:
            raise ValueError(f"step_timeout_s={step_timeout_s} must be > 0 or None")
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
        self.replan_at = replan_at
        self.ensemble_decay = ensemble_decay
        self.coherence_samples = coherence_samples
        self.n_envs = min(n_envs or len(self.seeds), len(self.seeds))
        self.vectorization = vectorization
        self.step_timeout_s = step_timeout_s
        self.n_videos = n_videos
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.fps = fps
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.scorer = scorer if scorer is not None else MaxRewardScorer()
        self.sampling_seed = sampling_seed
        self._n_runs = 0
        self._envs_built = False  # a first build failure is a config error and raises

    # -- public -----------------------------------------------------------------------------
    def run(self, policy: Policy) -> dict[str, Any]:
        """Rolls out every episode and summarizes them.

        Args:
            policy: Any object with ``predict_action``; an ``nn.Module`` is put in eval mode for
                the run and restored afterwards.

        Returns:
            ``"{split}/mean_score"``, ``"{split}/success_rate"``, ``"{split}/n_failed"`` and the
            scorer's summary ``"{split}/{key}"`` for each split with episodes,
            ``"per_episode"`` (dicts of :class:`EpisodeResult`), ``"videos"`` (MP4 paths), and
            ``"time/*"`` seconds.

        Raises:
            Exception: What building the envs raised, if they were never built before (a
                configuration error). Env failures later on are counted, not raised.
            KeyError, ValueError: The policy's output has no ``"action"`` or a wrong shape;
                the scorer's summary reuses a runner metric.
        """
        self._n_runs += 1
        episodes = [EpisodeResult(seed=seed, split=split) for split, seed in self.seeds]
        n_waves = -(-len(episodes) // self.n_envs)
        bar = tqdm(
            total=n_waves * self.max_steps,
            desc="rollout",
            unit="step",
            leave=False,
            disable=not self.progress,
        )
        stats = _Stats(bar)
        start = time.perf_counter()
        with bar, _eval_mode(policy):
            videos = self._run_episodes(episodes, policy, self._policy_device(policy), stats)
        stats.seconds["total"] = time.perf_counter() - start
        return self._summarize(episodes, videos, stats)

    # -- rollout ----------------------------------------------------------------------------
    def _run_episodes(
        self, episodes: list[EpisodeResult], policy: Policy, device: torch.device, stats: _Stats
    ) -> list[str]:
        """Runs the episodes in waves; a wave whose envs broke goes on in new envs.

        Returns:
            The paths of the videos written.
        """
        pending = deque(range(len(episodes)))  # episodes to run, in order
        attempts = [0] * len(episodes)
        videos: list[str] = []
        envs = None
        try:
            while pending:
                if envs is None:
                    envs = self._build_envs([episodes[i] for i in pending])
                    if envs is None:
                        break
                idx = [pending.popleft() for _ in range(min(self.n_envs, len(pending)))]
                for i in idx:
                    attempts[i] += 1
                record = [i < self.n_videos for i in idx]  # test episodes come first
                wave = Wave.start([episodes[i] for i in idx], envs.num_envs, record, self.scorer)
                try:
                    frames = self._run_wave(envs, policy, device, wave, stats)
                except faults.EnvCrash as crash:
                    faults.discard(envs)
                    envs = None
                    retry = wave.recover(crash, [attempts[i] for i in idx])
                    pending.extendleft(idx[j] for j in reversed(retry))
                    continue
                recorded = [ep for ep, r in zip(wave.episodes, record, strict=True) if r]
                videos += self._write_videos(recorded, frames)
        finally:
            if envs is not None:
                envs.close()
        return videos

    def _run_wave(
        self, envs: gym.vector.VectorEnv, policy: Policy, device: torch.device, wave: Wave,
        stats: _Stats,
    ) -> list[list[np.ndarray]]:  # fmt: skip
        """Runs a wave's episodes to their end.

        Returns:
            The frames of the recorded episodes, in wave order.

        Raises:
            faults.EnvCrash: The vector env broke; ``wave.done`` says which episodes had ended.
        """
        call = partial(faults.vector_call, envs, timeout=self.step_timeout_s)
        if wave.recording.any():
            call("set_attr", "recording", wave.recording.tolist())
        obs, info = call("reset", seed=wave.seeds)
        wave.fail({**faults.nonfinite_rows(obs, "observation"), **faults.env_errors(info)}, 0)
        controller = BatchController(
            policy,
            self.n_obs_steps,
            self.n_action_steps,
            device=device,
            action_dim=envs.single_action_space.shape[0],
            replan_at=self.replan_at,
            ensemble_decay=self.ensemble_decay,
            coherence_samples=self.coherence_samples,
            seed=None if self.sampling_seed is None else [self.sampling_seed, *wave.seeds],
        )
        step = 0
        while step < self.max_steps and not wave.done.all():
            with stats.timed("policy"):
                action = controller.act(_finite_obs(obs))  # (N, Da)
            ended = np.zeros_like(wave.done)
            if controller.planned is not None:  # a new chunk (N, Ta, Da)
                ended = wave.fail(faults.nonfinite_rows(controller.planned, "policy action"), step)
            # A failed env still steps (masked): keep its simulator finite.
            action = np.nan_to_num(action, nan=0.0, posinf=0.0, neginf=0.0)
            with stats.timed("env"):
                obs, reward, terminated, truncated, info = call("step", action)
            stats.env_steps += envs.num_envs
            stats.bar.update(1)
            step += 1
            ended |= wave.take_step(obs, reward, terminated | truncated, info, step)
            if (ended & wave.recording).any():  # stop before the autoreset adds frames
                wave.recording &= ~ended
                call("set_attr", "recording", wave.recording.tolist())
        stats.bar.update(self.max_steps - step)
        wave.score_unfinished()
        if not wave.recorded.any():
            return []
        frames = call("call", "pop_frames")
        call("set_attr", "recording", [False] * envs.num_envs)
        return [f for f, r in zip(frames, wave.recorded, strict=True) if r]

    def _make_envs(self) -> gym.vector.VectorEnv:
        fns = [partial(_make_env, self.env_fn, self.n_videos > 0)] * self.n_envs
        if self.vectorization == "async":
            envs = gym.vector.AsyncVectorEnv(fns)
        else:
            envs = gym.vector.SyncVectorEnv(fns)
        self._envs_built = True
        return envs

    def _build_envs(self, remaining: list[EpisodeResult]) -> gym.vector.VectorEnv | None:
        """Builds the envs; if that fails once they have worked, fails the remaining episodes.

        Raises:
            Exception: The first build ever failed: a configuration error, not a crash.
        """
        if not self._envs_built:
            return self._make_envs()
        try:
            return self._make_envs()
        except Exception as e:
            error = f"the envs could not be rebuilt: {faults.describe(e, '__init__')}"
            log.error("rollout: %s; %d episodes not run count as failed", error, len(remaining))
            for ep in remaining:
                ep.fail(error)
            return None

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

    def _write_videos(
        self, episodes: list[EpisodeResult], frames: list[list[np.ndarray]]
    ) -> list[str]:
        """Writes one MP4 per episode; one that cannot be written is logged and left out."""
        paths = []
        for ep, ep_frames in zip(episodes, frames, strict=True):
            if not ep_frames:  # it failed before its first frame
                continue
            path = self.output_dir / f"rollout{self._n_runs:03d}_{ep.split}_seed{ep.seed}.mp4"
            try:
                paths.append(str(write_video(path, ep_frames, fps=self.fps)))
            except Exception as e:  # a video must not cost the evaluation (e.g. a full disk)
                log.error(
                    "rollout: could not write the video of episode seed %d to %s (%s: %s); "
                    "its scores are kept, the video is left out",
                    ep.seed, path, type(e).__name__, e,
                )  # fmt: skip
                path.unlink(missing_ok=True)
        return paths

    def _summarize(
        self, episodes: list[EpisodeResult], videos: list[str], stats: _Stats
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for split in ("test", "train"):
            eps = [ep for ep in episodes if ep.split == split]
            if eps:
                result[f"{split}/mean_score"] = float(np.mean([ep.score for ep in eps]))
                result[f"{split}/success_rate"] = float(np.mean([ep.success for ep in eps]))
                result[f"{split}/n_failed"] = sum(ep.failed for ep in eps)
                for key, value in self._task_metrics(eps).items():
                    result[f"{split}/{key}"] = value
        seconds = stats.seconds
        result["time/total_s"] = seconds["total"]
        result["time/policy_s"] = seconds["policy"]
        result["time/env_s"] = seconds["env"]
        result["time/env_steps_per_s"] = stats.env_steps / max(seconds["env"], 1e-9)
        result["per_episode"] = [asdict(ep) for ep in episodes]
        result["videos"] = videos
        log.info(
            "rollout: %s in %.1fs (policy %.1fs, env %.1fs)",
            ", ".join(f"{k}={v:.3g}" for k, v in result.items() if "/" in k and "time" not in k),
            seconds["total"],
            seconds["policy"],
            seconds["env"],
        )
        return result

    def _task_metrics(self, episodes: list[EpisodeResult]) -> dict[str, float]:
        metrics = self.scorer.summarize(episodes)
        clash = sorted(set(metrics) & set(RUNNER_METRICS))
        if clash:
            raise ValueError(
                f"{type(self.scorer).__name__}.summarize returned {clash}, which the runner "
                f"reports itself ({', '.join(RUNNER_METRICS)}); name them otherwise"
            )
        return {key: float(value) for key, value in metrics.items()}


class PushTRunner(EnvRunner):
    """:class:`EnvRunner` on :class:`~diffusion_policy.envs.pusht_env.PushTEnv`.

    Args:
        obs_type: ``"keypoint"`` or ``"image"``.
        render_size: Side in pixels of video frames.
        image_size: Side in pixels of image observations.
        **kwargs: :class:`EnvRunner` arguments (episode counts, seeds, n_envs, videos, scorer;
            the scorer defaults to Push-T's :class:`MaxRewardScorer`).
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
        kwargs.setdefault("scorer", MaxRewardScorer())
        super().__init__(env_fn=env_fn, **kwargs)


@contextmanager
def _eval_mode(policy: Policy) -> Iterator[None]:
    """Puts an ``nn.Module`` policy in eval mode for the block, then back in training mode."""
    was_training = isinstance(policy, nn.Module) and policy.training
    if isinstance(policy, nn.Module):
        policy.eval()
    try:
        yield
    finally:
        if was_training:
            policy.train()


def _make_env(env_fn: Callable[[], gym.Env], record: bool) -> gym.Env:
    env = env_fn()
    return faults.FailSafe(FrameRecorder(env) if record else env)


def _finite_obs(obs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
    """A vector env's observation with uint8 (images) kept and the rest float32 and finite.

    Non-finite values become 0: they are in rows of failed, masked episodes only, and must not
    reach a policy that rejects them.
    """
    if isinstance(obs, dict):
        return {key: _finite_obs(value) for key, value in obs.items()}
    obs = np.asarray(obs)
    if obs.dtype == np.uint8:
        return obs
    return np.nan_to_num(obs.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
