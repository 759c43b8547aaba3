"""Env faults during rollouts: telling them apart and containing them, for the rollout runner.

Three kinds, from mild to severe:

- An env raises in ``reset``/``step`` (any exception but ``KeyboardInterrupt``, e.g. also
  ``SystemExit``): :class:`FailSafe`, around each env in its own process, ends the episode with
  ``info["env_error"]``; :func:`env_errors` reads them back. The vector env goes on.
- An env returns non-finite observations, or the policy non-finite actions:
  :func:`nonfinite_rows` names the rows and values; the runner fails those episodes.
- The vector env itself breaks (an async worker died, hung past the timeout or raised outside
  ``reset``/``step``): :func:`vector_call` raises :class:`EnvCrash` naming the workers at fault,
  :func:`triage` decides which episodes fail and which run again, :func:`discard` tears the
  envs down without waiting on their workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import traceback
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

log = logging.getLogger(__name__)

# Runs of an episode at most: one interrupted by another env's failure runs once more.
MAX_ATTEMPTS = 2


class EnvCrash(Exception):
    """The vector env broke: a worker died, hung or raised outside ``reset``/``step``.

    Attributes:
        culprits: ``{sub-env index: what happened to it}`` for the envs at fault (empty when
            they cannot be told).
    """

    def __init__(self, culprits: dict[int, str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}".rstrip(": "))
        self.culprits = culprits


class FailSafe(gym.Wrapper):
    """Turns an exception in ``reset``/``step`` into an ended episode with ``info["env_error"]``.

    It runs in the env's own process, so a bug in one env fails that episode only; the vector
    env and the other episodes go on. Any ``BaseException`` counts (a ``SystemExit`` or
    ``GeneratorExit`` from an env is a bug there, not a request to end the caller), except
    ``KeyboardInterrupt``: the user's Ctrl-C goes through.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._last_obs: Any = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        try:
            obs, info = self.env.reset(**kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            return self._placeholder(), {"env_error": describe(e, "reset")}
        self._last_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            return self._placeholder(), 0.0, True, False, {"env_error": describe(e, "step")}
        self._last_obs = obs
        return obs, reward, terminated, truncated, info

    def _placeholder(self) -> Any:
        """An observation for the masked, failed env (the vector env needs one)."""
        return self._last_obs if self._last_obs is not None else self.observation_space.sample()


def describe(e: BaseException, where: str) -> str:
    """``"RuntimeError in env.step() at file.py:12: message"``: the exception and its origin."""
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(e).__name__} in env.{where}(){at}: {e}"


def env_errors(info: dict[str, Any]) -> dict[int, str]:
    """``{sub-env: error}`` of the envs whose ``reset``/``step`` raised, from a vector info."""
    if "env_error" not in info:
        return {}
    return {int(j): str(info["env_error"][j]) for j in np.flatnonzero(info["_env_error"])}


def nonfinite_rows(batch: Any, what: str) -> dict[int, str]:
    """Finds the rows of a batch holding NaN or inf.

    Args:
        batch: An array ``(N, ...)`` or a dict of them; non-float arrays are skipped.
        what: How to name the batch in the message, e.g. ``"observation"``.

    Returns:
        ``{row: "observation['agent_pos'][1] is nan"}``, the first bad value of each bad row
            (its index within the row).
    """
    items = batch.items() if isinstance(batch, dict) else [(None, batch)]
    bad: dict[int, str] = {}
    for key, x in items:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            continue
        nonfinite = ~np.isfinite(x).reshape(len(x), -1)  # (N, prod(...))
        name = what if key is None else f"{what}[{key!r}]"
        for j in np.flatnonzero(nonfinite.any(axis=1)):
            index = np.unravel_index(np.argmax(nonfinite[j]), x.shape[1:])
            where = f"[{', '.join(str(i) for i in index)}]" if index else ""
            bad.setdefault(int(j), f"{name}{where} is {x[j][index]}")
    return bad


def vector_call(
    envs: gym.vector.VectorEnv, method: str, *args: Any, timeout: float | None, **kwargs: Any
) -> Any:
    """Calls ``envs.<method>(*args, **kwargs)`` (``reset``, ``step``, ``call``, ``set_attr``).

    An async ``reset``/``step``/``call`` waits at most ``timeout`` seconds (None: forever).

    Raises:
        EnvCrash: The vector env broke; it names the workers at fault. ``KeyboardInterrupt``
            goes through as it is.
    """
    try:
        if isinstance(envs, gym.vector.AsyncVectorEnv) and hasattr(envs, f"{method}_wait"):
            getattr(envs, f"{method}_async")(*args, **kwargs)
            return getattr(envs, f"{method}_wait")(timeout=timeout)
        return getattr(envs, method)(*args, **kwargs)
    except Exception as e:
        raise EnvCrash(broken_workers(envs, e), e) from e


def broken_workers(envs: gym.vector.VectorEnv, error: BaseException) -> dict[int, str]:
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


def triage(
    crash: EnvCrash, done: np.ndarray, attempts: list[int]
) -> tuple[dict[int, str], list[int]]:
    """Decides what a crash costs each unfinished episode of the wave.

    The episodes of the envs at fault fail. The other unfinished ones run again from their
    reset, once: one interrupted ``MAX_ATTEMPTS`` times fails. When the envs at fault cannot be
    told (one process), every unfinished episode fails.

    Args:
        crash: What broke.
        done: ``(n,)`` bool, the wave's episodes that had ended before the crash.
        attempts: Runs of each of the wave's episodes so far, this one included.

    Returns:
        ``({wave position: error}, [wave positions to run again])``.
    """
    unfinished = [j for j in range(len(done)) if not done[j]]
    failed, retry = {}, []
    for j in unfinished:
        if j in crash.culprits or not crash.culprits:
            failed[j] = f"env worker {j} {crash.culprits.get(j, 'failed')} ({crash})"
        elif attempts[j] >= MAX_ATTEMPTS:
            failed[j] = f"interrupted {attempts[j]} times by other envs' failures: {crash}"
        else:
            retry.append(j)
    return failed, retry


def discard(envs: gym.vector.VectorEnv) -> None:
    """Closes broken envs without waiting on their workers (they may be dead or hung)."""
    try:
        if isinstance(envs, gym.vector.AsyncVectorEnv):
            for p in envs.processes:
                if p.is_alive():
                    p.kill()
            # A call cut short leaves the env awaiting answers that will never come; close()
            # takes closed pipes as a timeout and then only reaps the (killed) workers.
            for pipe in envs.parent_pipes:
                if pipe is not None:
                    pipe.close()
            with warnings.catch_warnings():  # "close while waiting for a pending call": we know
                warnings.filterwarnings("ignore", message=".*while waiting for a pending call")
                envs.close(terminate=True)
        else:
            envs.close()
    except Exception as e:
        log.warning("rollout: closing the broken envs raised %s: %s", type(e).__name__, e)
