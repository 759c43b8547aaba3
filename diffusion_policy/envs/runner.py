"""Scores any policy with ``predict_action`` by rollouts in vectorized environments.

The defaults are the paper's Push-T protocol: 50 test episodes with seeds 100000..100049 and 6
train episodes with seeds 0..5 (logged separately), at most 300 steps, the policy seeing the last
2 observations and its 8 actions executed one by one. An episode's score is its maximum reward,
its success whether ``info["is_success"]`` was ever true.

Failures of the environments never take the caller (e.g. a training run) down: an exception in
an env's ``reset``/``step`` ends its episode as failed; a worker process that dies, hangs past
``step_timeout_s`` or breaks the vector env otherwise fails its episode, and the other
unfinished episodes of its wave run again in new envs. Failed episodes score 0 and are counted
in ``"{split}/n_failed"``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.async_vector_env import AsyncState
from torch import nn
from tqdm import tqdm

from diffusion_policy.envs.pusht_env import OBS_TYPES, make_pusht_env
from diffusion_policy.envs.video import FrameRecorder, write_video

log = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async")
# Runs of an episode at most: one interrupted by another env's failure runs once more.
MAX_ATTEMPTS = 2


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
    failed: bool = False
    error: str | None = None

    def fail(self, error: str) -> None:
        """Marks the episode failed: score 0, no success."""
        self.failed, self.error, self.score, self.success = True, error, 0.0, False

    def restart(self) -> None:
        """Forgets a partial run, before running the episode again."""
        self.score, self.success, self.steps = 0.0, False, 0


class _EnvCrash(Exception):
    """The vector env broke: a worker died, hung or raised outside ``reset``/``step``.

    Attributes:
        culprits: ``{sub-env index: what happened to it}`` for the envs at fault (empty when
            they cannot be told).
        done: ``(N,)`` bool, the envs whose episodes had ended (set by the wave loop).
    """

    def __init__(self, culprits: dict[int, str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}".rstrip(": "))
        self.culprits = culprits
        self.done: np.ndarray | None = None


class _FailSafe(gym.Wrapper):
    """Turns an exception in ``reset``/``step`` into an ended episode with ``info["env_error"]``.

    It runs in the env's own process, so a bug in one env fails that episode only; the vector
    env and the other episodes go on.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._last_obs: Any = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        try:
            obs, info = self.env.reset(**kwargs)
        except Exception as e:
            return self._placeholder(), {"env_error": _describe(e, "reset")}
        self._last_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as e:
            return self._placeholder(), 0.0, True, False, {"env_error": _describe(e, "step")}
        self._last_obs = obs
        return obs, reward, terminated, truncated, info

    def _placeholder(self) -> Any:
        """An observation for the masked, failed env (the vector env needs one)."""
        return self._last_obs if self._last_obs is not None else self.observation_space.sample()


def _describe(e: BaseException, where: str) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(e).__name__} in env.{where}(){at}: {e}"


def _stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    """Per-env frames [(N, ...)] * To -> (N, To, ...): uint8 (images) kept, the rest float32."""
    stacked = np.stack(frames, axis=1)
    return stacked if stacked.dtype == np.uint8 else stacked.astype(np.float32)


def _make_env(env_fn: Callable[[], gym.Env], record: bool) -> gym.Env:
    env = env_fn()
    return _FailSafe(FrameRecorder(env) if record else env)


class EnvRunner:
    """Evaluates a policy on episodes of an environment, in waves of ``n_envs`` parallel envs.

    Observations reach the policy as tensors on its device, ``(B, To, *obs_shape)`` per key (a
    non-dict observation under the key ``"obs"``): float32, except uint8 ones (images, as the
    datasets hold them), which stay uint8. They are the last ``n_obs_steps`` frames, with
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
        step_timeout_s: With ``"async"``, seconds a vector ``reset``/``step`` may take before
            the workers that have not answered count as hung (their episodes fail, the envs
            are replaced); None waits forever. A ``"sync"`` env runs in this process and
            cannot be timed out.
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
        step_timeout_s: float | None = 60.0,
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
        self.n_envs = min(n_envs or len(self.seeds), len(self.seeds))
        self.vectorization = vectorization
        self.step_timeout_s = step_timeout_s
        self.n_videos = n_videos
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.fps = fps
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self._n_runs = 0
        self._envs_built = False  # a first build failure is a config error and raises

    # -- public -----------------------------------------------------------------------------
    def run(self, policy: Policy) -> dict[str, Any]:
        """Rolls out every episode and summarizes them.

        Args:
            policy: Any object with ``predict_action``; an ``nn.Module`` is put in eval mode for
                the run and restored afterwards.

        Returns:
            ``"{split}/mean_score"``, ``"{split}/success_rate"`` and ``"{split}/n_failed"`` for
            each split with episodes, ``"per_episode"`` (dicts of :class:`EpisodeResult`),
            ``"videos"`` (MP4 paths), and ``"time/*"`` seconds.

        Raises:
            Exception: What building the envs raised, if they were never built before (a
                configuration error). Env failures later on are counted, not raised.
        """
        self._n_runs += 1
        device = self._policy_device(policy)
        was_training = policy.training if isinstance(policy, nn.Module) else None
        if isinstance(policy, nn.Module):
            policy.eval()
        episodes = [EpisodeResult(seed=seed, split=split) for split, seed in self.seeds]
        record = [i < self.n_videos for i in range(len(episodes))]  # test episodes come first
        attempts = [0] * len(episodes)
        n_waves = -(-len(episodes) // self.n_envs)
        timer = {"policy": 0.0, "env": 0.0, "env_steps": 0}
        videos: list[str] = []
        start = time.perf_counter()
        envs = None
        bar = tqdm(
            total=n_waves * self.max_steps,
            desc="rollout",
            unit="step",
            leave=False,
            disable=not self.progress,
        )
        pending = list(range(len(episodes)))  # episodes to run, in order
        try:
            while pending:
                idx, pending = pending[: self.n_envs], pending[self.n_envs :]
                wave = [episodes[i] for i in idx]
                wave_record = [record[i] for i in idx]
                if envs is None:
                    envs = self._build_envs(wave + [episodes[i] for i in pending])
                    if envs is None:
                        break
                for i in idx:
                    attempts[i] += 1
                try:
                    frames = self._run_wave(envs, policy, device, wave, wave_record, bar, timer)
                except _EnvCrash as crash:
                    _discard(envs)
                    envs = None
                    retry = self._fail_wave(wave, crash, [attempts[i] for i in idx])
                    pending = [idx[j] for j in retry] + pending
                    continue
                recorded = [ep for ep, r in zip(wave, wave_record, strict=True) if r]
                videos += self._write_videos(recorded, frames)
        finally:
            bar.close()
            if envs is not None:
                envs.close()
            if was_training:
                policy.train()
        timer["total"] = time.perf_counter() - start
        return self._summarize(episodes, videos, timer)

    # -- rollout ----------------------------------------------------------------------------
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
            error = f"the envs could not be rebuilt: {_describe(e, '__init__')}"
            log.error("rollout: %s; %d episodes not run count as failed", error, len(remaining))
            for ep in remaining:
                ep.fail(error)
            return None

    def _fail_wave(
        self, wave: list[EpisodeResult], crash: _EnvCrash, attempts: list[int]
    ) -> list[int]:
        """Fails the episodes of the envs at fault; returns the wave positions to run again.

        The other unfinished episodes run again from their reset, once; an episode interrupted
        twice, or every unfinished one when the envs at fault cannot be told, fails.
        """
        n = len(wave)
        unfinished = [j for j in range(n) if not crash.done[j]]
        culprits = [j for j in unfinished if j in crash.culprits]
        if not crash.culprits:
            culprits = unfinished
        retry = []
        for j in unfinished:
            if j in culprits:
                what = crash.culprits.get(j, "failed")
                wave[j].fail(f"env worker {j} {what} ({crash})")
            elif attempts[j] >= MAX_ATTEMPTS:
                wave[j].fail(f"interrupted {attempts[j]} times by other envs' failures: {crash}")
            else:
                wave[j].restart()
                retry.append(j)
        log.error(
            "rollout: the envs broke (%s); worker(s) at fault: %s; failed episodes: seeds %s; "
            "run again in new envs: seeds %s",
            crash,
            crash.culprits or "unknown",
            [wave[j].seed for j in unfinished if wave[j].failed],
            [wave[j].seed for j in retry],
        )
        return retry

    def _reset(self, envs: gym.vector.VectorEnv, seeds: list[int]) -> tuple[Any, dict]:
        try:
            if isinstance(envs, gym.vector.AsyncVectorEnv):
                envs.reset_async(seed=seeds)
                return envs.reset_wait(timeout=self.step_timeout_s)
            return envs.reset(seed=seeds)
        except Exception as e:
            raise _EnvCrash(_broken_workers(envs, e), e) from e

    def _step(self, envs: gym.vector.VectorEnv, action: np.ndarray) -> tuple:
        try:
            if isinstance(envs, gym.vector.AsyncVectorEnv):
                envs.step_async(action)
                return envs.step_wait(timeout=self.step_timeout_s)
            return envs.step(action)
        except Exception as e:
            raise _EnvCrash(_broken_workers(envs, e), e) from e

    def _set_recording(self, envs: gym.vector.VectorEnv, recording: np.ndarray) -> None:
        try:
            envs.set_attr("recording", recording.tolist())
        except Exception as e:
            raise _EnvCrash(_broken_workers(envs, e), e) from e

    def _pop_frames(self, envs: gym.vector.VectorEnv) -> list[list[np.ndarray]]:
        try:
            if isinstance(envs, gym.vector.AsyncVectorEnv):
                envs.call_async("pop_frames")
                return list(envs.call_wait(timeout=self.step_timeout_s))
            return list(envs.call("pop_frames"))
        except Exception as e:
            raise _EnvCrash(_broken_workers(envs, e), e) from e

    @staticmethod
    def _fail_errored(info: dict[str, Any], wave: list[EpisodeResult], live: np.ndarray) -> Any:
        """Fails the live episodes whose env raised in reset/step; returns their (N,) mask."""
        if "env_error" not in info:
            return np.zeros_like(live)
        failed = np.asarray(info["_env_error"], dtype=bool) & live
        for j in np.flatnonzero(failed):
            wave[j].fail(str(info["env_error"][j]))
            log.error("rollout: episode seed %d failed: %s", wave[j].seed, wave[j].error)
        return failed

    def _run_wave(
        self,
        envs: gym.vector.VectorEnv,
        policy: Policy,
        device: torch.device,
        wave: list[EpisodeResult],
        record: list[bool],
        bar: tqdm,
        timer: dict[str, float],
    ) -> list[list[np.ndarray]]:
        """Runs one episode per env (padding envs repeat the last seed, masked from the start).

        Returns:
            The frames of the episodes with ``record`` set, in wave order.

        Raises:
            _EnvCrash: The vector env broke; its ``done`` says which episodes had ended.
        """
        n_envs, n = envs.num_envs, len(wave)
        seeds = [ep.seed for ep in wave] + [wave[-1].seed] * (n_envs - n)
        recording = np.zeros(n_envs, dtype=bool)  # (N,)
        recording[:n] = record
        done = np.arange(n_envs) >= n  # (N,)
        try:
            if recording.any():
                self._set_recording(envs, recording)
            obs, info = self._reset(envs, seeds)
            done |= self._fail_errored(info, wave, ~done)
            step = self._step_wave(envs, policy, device, wave, obs, done, recording, bar, timer)
            bar.update(self.max_steps - step)
            if not any(record):
                return []
            frames = self._pop_frames(envs)
            self._set_recording(envs, np.zeros(n_envs, dtype=bool))
        except _EnvCrash as crash:
            crash.done = done
            raise
        return [f for f, r in zip(frames, record, strict=False) if r]

    def _step_wave(
        self,
        envs: gym.vector.VectorEnv,
        policy: Policy,
        device: torch.device,
        wave: list[EpisodeResult],
        obs: Any,
        done: np.ndarray,
        recording: np.ndarray,
        bar: tqdm,
        timer: dict[str, float],
    ) -> int:
        """Steps the envs until every episode ended or ``max_steps``; returns the steps taken.

        Updates ``done`` and ``recording`` in place.
        """
        n_envs = envs.num_envs
        history = deque([obs] * self.n_obs_steps, maxlen=self.n_obs_steps)
        step = 0
        while step < self.max_steps and not done.all():
            tic = time.perf_counter()
            actions = self._predict(policy, history, device, envs)  # (N, Ta, Da)
            timer["policy"] += time.perf_counter() - tic
            for action in actions.swapaxes(0, 1)[: self.n_action_steps]:  # (N, Da) each
                tic = time.perf_counter()
                obs, reward, terminated, truncated, info = self._step(envs, action)
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
                self._fail_errored(info, wave, ended)  # a raising env ends its episode
                done |= ended
                step += 1
                bar.update(1)
                if (ended & recording).any():  # stop before the autoreset adds frames
                    recording &= ~ended
                    self._set_recording(envs, recording)
                if step >= self.max_steps or done.all():
                    break
        return step

    def _predict(
        self,
        policy: Policy,
        history: deque,
        device: torch.device,
        envs: gym.vector.VectorEnv,
    ) -> np.ndarray:
        frames = [h if isinstance(h, dict) else {"obs": h} for h in history]
        obs = {
            key: torch.from_numpy(_stack_frames([f[key] for f in frames])).to(device)
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
                result[f"{split}/n_failed"] = sum(ep.failed for ep in eps)
        result["time/total_s"] = timer["total"]
        result["time/policy_s"] = timer["policy"]
        result["time/env_s"] = timer["env"]
        result["time/env_steps_per_s"] = timer["env_steps"] / max(timer["env"], 1e-9)
        result["per_episode"] = [asdict(ep) for ep in episodes]
        result["videos"] = videos
        log.info(
            "rollout: %s in %.1fs (policy %.1fs, env %.1fs)",
            ", ".join(f"{k}={v:.3g}" for k, v in result.items() if "/" in k and "time" not in k),
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


def _broken_workers(envs: gym.vector.VectorEnv, error: BaseException) -> dict[int, str]:
    """``{index: what happened}`` of the async workers that died, raised or did not answer."""
    if not isinstance(envs, gym.vector.AsyncVectorEnv):
        return {}  # One process: the env at fault cannot be told.
    procs = envs.processes
    # A dead worker's pipe reports EOF as it exits; wait a moment for the exit to show.
    exited = set(multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5))
    broken = {}
    for i, p in enumerate(procs):
        if p.sentinel in exited:
            p.join(timeout=1.0)
            code = p.exitcode
            broken[i] = (
                f"died (killed by signal {-code})"
                if code is not None and code < 0
                else f"died (exit code {code})"
            )
        elif envs.parent_pipes[i] is None:  # gymnasium drops the pipe of a worker that raised
            broken[i] = "raised"
    if isinstance(error, multiprocessing.TimeoutError):
        for i, pipe in enumerate(envs.parent_pipes):
            if i not in broken and pipe is not None and not pipe.closed and not pipe.poll(0):
                broken[i] = "did not answer in time (hung)"
    return broken


def _discard(envs: gym.vector.VectorEnv) -> None:
    """Closes broken envs without waiting on their workers (they may be dead or hung)."""
    try:
        if isinstance(envs, gym.vector.AsyncVectorEnv):
            for p in envs.processes:
                if p.is_alive():
                    p.kill()
            # The failed call left the env waiting for answers that will never come.
            envs._state = AsyncState.DEFAULT
            envs.close(terminate=True)
        else:
            envs.close()
    except Exception as e:
        log.warning("rollout: closing the broken envs raised %s: %s", type(e).__name__, e)
