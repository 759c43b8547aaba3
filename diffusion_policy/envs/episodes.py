"""Rollout episodes: their results, and the bookkeeping of a wave of them run side by side.

A :class:`Wave` is what the runner's step loop changes: which episodes are done, which are
filmed, each episode's rewards and infos until the task's scorer scores it, and what a crash of
the vector env costs each episode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffusion_policy.envs import faults
from diffusion_policy.envs.scoring import Scorer

log = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    """The outcome of one rollout episode; ``extra`` holds the task scorer's extra values."""

    seed: int
    split: str
    score: float = 0.0
    success: bool = False
    steps: int = 0
    failed: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(self, error: str) -> None:
        """Marks the episode failed: score 0, no success."""
        self.failed, self.error, self.score, self.success, self.extra = True, error, 0.0, False, {}

    def restart(self) -> None:
        """Forgets a partial run, before running the episode again."""
        self.score, self.success, self.steps, self.extra = 0.0, False, 0, {}


@dataclass
class Wave:
    """The episodes one vector env of N sub-envs runs at once: sub-env ``j`` runs episode ``j``.

    Sub-envs past the episodes (a last, smaller wave) repeat the last seed and are done from the
    start. A done sub-env keeps stepping (the vector env autoresets it); its results are ignored.
    """

    episodes: list[EpisodeResult]  # (n,), n <= N
    scorer: Scorer
    done: np.ndarray  # (N,) bool: ended, failed or padding
    recorded: np.ndarray  # (N,) bool: sub-envs whose video is kept
    recording: np.ndarray  # (N,) bool: recorded and not yet ended
    rewards: list[list[float]]  # (n,) lists, one reward per step
    infos: list[list[dict[str, Any]]]  # (n,) lists, one info per step

    @classmethod
    def start(
        cls, episodes: list[EpisodeResult], n_envs: int, record: list[bool], scorer: Scorer
    ) -> Wave:
        """A wave of ``episodes`` on ``n_envs`` sub-envs, filming those with ``record`` set."""
        recorded = np.zeros(n_envs, dtype=bool)
        recorded[: len(episodes)] = record
        return cls(
            episodes=episodes,
            scorer=scorer,
            done=np.arange(n_envs) >= len(episodes),
            recorded=recorded,
            recording=recorded.copy(),
            rewards=[[] for _ in episodes],
            infos=[[] for _ in episodes],
        )

    @property
    def seeds(self) -> list[int]:
        """The reset seed of each sub-env."""
        padding = len(self.done) - len(self.episodes)
        return [ep.seed for ep in self.episodes] + [self.episodes[-1].seed] * padding

    def fail(self, errors: dict[int, str], step: int) -> np.ndarray:
        """Fails the running episodes among ``{sub-env: error}``; returns their (N,) mask."""
        failed = np.zeros_like(self.done)
        for j, error in errors.items():
            if not self.done[j]:
                self.episodes[j].fail(f"{error} (env step {step})")
                log.error("rollout: episode seed %d failed: %s", self.episodes[j].seed, error)
                failed[j] = True
        self.done |= failed
        return failed

    def take_step(
        self, obs: Any, reward: np.ndarray, ended: np.ndarray, info: dict[str, Any], step: int
    ) -> np.ndarray:
        """Takes in one vector step's results; returns the (N,) mask of episodes it ended.

        An episode ends when its env terminates or truncates it, raises, or returns a
        non-finite observation (the last two fail it).
        """
        running = ~self.done  # (N,)
        for j in np.flatnonzero(running):
            self.rewards[j].append(float(reward[j]))
            self.infos[j].append(env_info(info, j))
            self.episodes[j].steps += 1
        errors = {**faults.nonfinite_rows(obs, "observation"), **faults.env_errors(info)}
        failed = self.fail(errors, step)
        ended = running & ended & ~failed  # (N,)
        for j in np.flatnonzero(ended):
            self._score(j)
        self.done |= ended
        return ended | failed

    def score_unfinished(self) -> None:
        """Scores the episodes still running when the steps ran out."""
        for j in np.flatnonzero(~self.done):
            self._score(j)

    def recover(self, crash: faults.EnvCrash, attempts: list[int]) -> list[int]:
        """Fails or restarts the unfinished episodes after the vector env broke.

        Args:
            crash: What broke.
            attempts: Runs of each episode so far, this one included.

        Returns:
            The positions of the episodes to run again.
        """
        failed, retry = faults.triage(crash, self.done[: len(self.episodes)], attempts)
        for j, error in failed.items():
            self.episodes[j].fail(error)
        for j in retry:
            self.episodes[j].restart()
        log.error(
            "rollout: the envs broke (%s); worker(s) at fault: %s; failed episodes: seeds %s; "
            "run again in new envs: seeds %s",
            crash,
            crash.culprits or "unknown",
            [self.episodes[j].seed for j in failed],
            [self.episodes[j].seed for j in retry],
        )
        return retry

    def _score(self, j: int) -> None:
        result = self.scorer.score(self.rewards[j], self.infos[j])
        ep = self.episodes[j]
        ep.score, ep.success, ep.extra = float(result.score), bool(result.success), result.extra


def env_info(info: dict[str, Any], j: int) -> dict[str, Any]:
    """Sub-env ``j``'s info from a vector env's: ``{key: (N,) values, "_key": (N,) has-value}``."""
    out = {}
    for key, value in info.items():
        has_value = info.get(f"_{key}")
        if key.startswith("_") or (has_value is not None and not has_value[j]):
            continue
        out[key] = env_info(value, j) if isinstance(value, dict) else value[j]
    return out
