"""Env failures during rollouts: crashed, hung or raising envs fail their episode, never the run."""

from __future__ import annotations

import os
import time
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from diffusion_policy.envs.runner import EnvRunner

LENGTH = 6  # steps of a healthy episode; its score is LENGTH / 10


class FaultyEnv(gym.Env):
    """Ends after LENGTH steps, unless the episode of ``bad_seed`` fails at step ``at_step``.

    ``fault``: ``"crash"`` (the process dies: ``os._exit``), ``"hang"`` (sleeps 10 minutes),
    ``"raise"`` (RuntimeError), an exception class to raise (e.g. ``SystemExit``), ``"nan"`` (a
    NaN observation) or ``"init"`` (the constructor raises). ``bad_seed="all"`` fails every
    episode; ``at_step=0`` fails in ``reset``.
    """

    observation_space = spaces.Box(-1e3, 1e3, shape=(3,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def __init__(self, fault: str | None = None, bad_seed: int | str | None = None, at_step=2):
        if fault == "init":
            raise RuntimeError("cannot build this env")
        self.fault, self.bad_seed, self.at_step = fault, bad_seed, at_step
        self.episode_seed: int | None = None
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode_seed, self.t = seed, 0
        self._maybe_fail()
        return self._obs(), {"is_success": False}

    def step(self, action):
        self.t += 1
        self._maybe_fail()
        ended = self.t >= LENGTH
        return self._obs(), self.t / 10, ended, False, {"is_success": ended}

    def _obs(self):
        obs = np.full(3, self.t, np.float32)
        if self.fault == "nan" and self._failing():
            obs[1] = np.nan
        return obs

    def _failing(self):
        bad = self.bad_seed == "all" or self.episode_seed == self.bad_seed
        return bad and self.episode_seed is not None and self.t == self.at_step

    def _maybe_fail(self):
        if not self._failing():
            return
        if self.fault == "crash":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(600)
        if self.fault == "raise":
            raise RuntimeError(f"boom on seed {self.episode_seed}")
        if isinstance(self.fault, type):
            raise self.fault(f"boom on seed {self.episode_seed}")


class ZeroPolicy:
    def predict_action(self, obs):
        return {"action": torch.zeros(obs["obs"].shape[0], 4, 2)}


def _runner(fault, bad_seed, vectorization="async", at_step=2, **kwargs) -> EnvRunner:
    kwargs = {"n_test": 4, "n_train": 0, "n_envs": 2, "max_steps": 10, **kwargs}
    return EnvRunner(
        partial(FaultyEnv, fault=fault, bad_seed=bad_seed, at_step=at_step),
        n_obs_steps=1,
        n_action_steps=4,
        vectorization=vectorization,
        progress=False,
        **kwargs,
    )


def _check(result, failed_seeds, error_match):
    for ep in result["per_episode"]:
        if ep["seed"] in failed_seeds:
            assert ep["failed"] and ep["score"] == 0.0 and not ep["success"], ep
            assert error_match in ep["error"], ep["error"]
        else:  # Healthy episodes ran to their end, also those rerun after a wave broke.
            assert not ep["failed"] and ep["error"] is None, ep
            assert (ep["steps"], ep["score"], ep["success"]) == (LENGTH, LENGTH / 10, True), ep
    n = len(result["per_episode"])
    assert result["test/n_failed"] == len(failed_seeds)
    assert result["test/mean_score"] == pytest.approx((n - len(failed_seeds)) * LENGTH / 10 / n)


@pytest.mark.parametrize("at_step", [0, 2], ids=["in_reset", "in_step"])
def test_async_worker_crash_is_counted_and_replaced(at_step):
    """The original runner died with EOFError here; this one replaces the envs and goes on."""
    result = _runner("crash", 100001, at_step=at_step).run(ZeroPolicy())
    _check(result, {100001}, "env worker 1 died (exit code 3) (EOFError")


def test_async_worker_hang_times_out():
    tic = time.perf_counter()
    result = _runner("hang", 100002, step_timeout_s=1.0).run(ZeroPolicy())
    assert time.perf_counter() - tic < 30
    _check(result, {100002}, "env worker 0 did not answer in time (hung) (TimeoutError")


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_raising_env_fails_its_episode_only(vectorization):
    result = _runner("raise", 100003, vectorization).run(ZeroPolicy())
    _check(result, {100003}, "RuntimeError in env.step() at test_runner_failures.py")
    assert "boom on seed 100003" in result["per_episode"][3]["error"]


def test_every_worker_crashing_still_finishes():
    runner = _runner("crash", "all", n_test=3, n_envs=3)
    result = runner.run(ZeroPolicy())
    _check(result, {100000, 100001, 100002}, "died (exit code 3)")
    # The runner is still usable: the next evaluation builds new envs.
    assert runner.run(ZeroPolicy())["test/n_failed"] == 3


def test_runner_is_reusable_after_a_crash():
    runner = _runner("crash", 100000, n_test=3, n_train=1, n_envs=None)
    for _ in range(2):
        result = runner.run(ZeroPolicy())
        _check({**result, "per_episode": result["per_episode"][:3]}, {100000}, "died")
        assert result["train/n_failed"] == 0 and result["train/mean_score"] == LENGTH / 10


def test_env_that_cannot_be_built_is_a_config_error():
    with pytest.raises(RuntimeError, match="cannot build this env"):
        _runner("init", None, vectorization="sync").run(ZeroPolicy())


def test_step_timeout_is_validated():
    with pytest.raises(ValueError, match="step_timeout_s=0"):
        _runner(None, None, step_timeout_s=0)


@pytest.mark.parametrize(
    ("exception", "vectorization"),
    [(SystemExit, "sync"), (GeneratorExit, "sync"), (SystemExit, "async")],
)
def test_env_raising_a_base_exception_fails_its_episode_only(exception, vectorization):
    """A sync env's SystemExit used to end training with exit code 0 and no message."""
    result = _runner(exception, 100001, vectorization).run(ZeroPolicy())
    _check(result, {100001}, f"{exception.__name__} in env.step() at test_runner_failures.py")


def test_keyboard_interrupt_in_an_env_goes_through():
    """The user's Ctrl-C is not an env failure: the trainer sees it."""
    with pytest.raises(KeyboardInterrupt):
        _runner(KeyboardInterrupt, 100001, "sync").run(ZeroPolicy())


@pytest.mark.parametrize("at_step", [0, 2], ids=["in_reset", "in_step"])
def test_nonfinite_observation_fails_its_episode_only(at_step):
    result = _runner("nan", 100002, "sync", at_step=at_step).run(ZeroPolicy())
    _check(result, {100002}, f"observation[1] is nan (env step {at_step})")


class NanRowPolicy:
    """Zero actions, except a NaN in every call's row 1: the second env of each wave."""

    def predict_action(self, obs):
        action = torch.zeros(obs["obs"].shape[0], 4, 2)  # (B, Ta, Da)
        action[1, 2, 0] = float("nan")
        return {"action": action}


def test_nonfinite_action_fails_its_episode_only():
    result = _runner(None, None, "sync").run(NanRowPolicy())
    _check(result, {100001, 100003}, "policy action[2, 0] is nan (env step 0)")
