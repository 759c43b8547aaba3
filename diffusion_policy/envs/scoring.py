"""Per-task scoring of rollout episodes: how a task turns rewards and infos into metrics.

The rollout runner knows no task's rule; it hands each episode's per-step rewards and infos to a
:class:`Scorer` when the episode ends, and each split's episodes to ``Scorer.summarize`` at the
end of a run. A new task subclasses :class:`Scorer`; e.g. a BlockPush scorer could return
``EpisodeScore(score=n_in_target / 2, success=n_in_target == 2, extra={"n_in_target": n})``
and summarize ``{"p1": mean(n >= 1), "p2": mean(n >= 2)}``, logged as ``test/p1``, ``test/p2``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusion_policy.envs.episodes import EpisodeResult


@dataclass
class EpisodeScore:
    """One episode's score.

    Attributes:
        score: Averaged over a split's episodes as ``"{split}/mean_score"``.
        success: Averaged as ``"{split}/success_rate"``.
        extra: Further per-episode values (plain data: numbers, strings), kept in the
            runner's ``per_episode`` results for :meth:`Scorer.summarize`.
    """

    score: float
    success: bool
    extra: dict[str, Any] = field(default_factory=dict)


class Scorer(ABC):
    """A task's scoring rule: per episode, and a summary per split."""

    @abstractmethod
    def score(self, rewards: Sequence[float], infos: Sequence[dict[str, Any]]) -> EpisodeScore:
        """Scores one episode that ended (or ran out of steps) without failing.

        Args:
            rewards: The reward of each env step, in order (the reset has none).
            infos: The ``info`` dict of each env step, in order, as the env returned it.

        Returns:
            The episode's score, success and extra values.
        """

    def summarize(self, episodes: Sequence[EpisodeResult]) -> dict[str, float]:
        """Extra metrics over one split's episodes, logged as ``"{split}/{key}"``.

        Args:
            episodes: The split's episodes, failed ones included (score 0, no success, empty
                ``extra``), so rates count a failed episode as a miss.

        Returns:
            ``{key: value}``; keys must not be ``mean_score``, ``success_rate`` or
            ``n_failed``, which the runner reports for every task. None by default.
        """
        return {}


class MaxRewardScorer(Scorer):
    """Push-T's rule (the paper's): the maximum reward, success if ``is_success`` was ever true.

    Push-T's reward is the goal coverage, so the score is the best coverage reached. The score
    is never below 0, a failed episode's score.
    """

    def score(self, rewards: Sequence[float], infos: Sequence[dict[str, Any]]) -> EpisodeScore:
        return EpisodeScore(
            score=max([0.0, *(float(r) for r in rewards)]),
            success=any(bool(info.get("is_success", False)) for info in infos),
        )
