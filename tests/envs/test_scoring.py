"""Per-task scoring: a custom Scorer's per-episode values and summary reach the results."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from diffusion_policy.envs.runner import EnvRunner
from diffusion_policy.envs.scoring import EpisodeScore, MaxRewardScorer, Scorer


class BlocksEnv(gym.Env):
    """Ends after 3 steps with ``seed % 3`` blocks in the target; reward 1 per step."""

    observation_space = spaces.Box(-1e3, 1e3, shape=(2,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.blocks, self.t = (seed or 0) % 3, 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), 1.0, self.t == 3, False, {"blocks": self.blocks}


class BlocksScorer(Scorer):
    """A BlockPush-like rule: p1 and p2 are the fractions with at least 1 and 2 blocks in."""

    def score(self, rewards, infos):
        n = int(infos[-1]["blocks"])
        return EpisodeScore(score=sum(rewards) / 10 + n, success=n == 2, extra={"n_blocks": n})

    def summarize(self, episodes):
        n = np.array([ep.extra.get("n_blocks", 0) for ep in episodes])
        return {"p1": np.mean(n >= 1), "p2": np.mean(n >= 2)}


class ZeroPolicy:
    def predict_action(self, obs):
        return {"action": torch.zeros(obs["obs"].shape[0], 2, 2)}


def _runner(scorer: Scorer) -> EnvRunner:
    return EnvRunner(
        BlocksEnv, n_test=3, test_start_seed=0, n_train=2, train_start_seed=2, n_envs=2,
        max_steps=5, n_obs_steps=1, n_action_steps=2, progress=False, scorer=scorer,
    )  # fmt: skip


def test_custom_scorer_metrics_appear_in_the_results():
    result = _runner(BlocksScorer()).run(ZeroPolicy())
    eps = result["per_episode"]
    assert [e["extra"] for e in eps] == [{"n_blocks": n} for n in (0, 1, 2, 2, 0)]
    assert [e["score"] for e in eps] == pytest.approx([0.3, 1.3, 2.3, 2.3, 0.3])
    assert result["test/mean_score"] == pytest.approx(1.3)
    assert result["test/success_rate"] == pytest.approx(1 / 3)
    assert (result["test/p1"], result["test/p2"]) == pytest.approx((2 / 3, 1 / 3))
    assert (result["train/p1"], result["train/p2"]) == (0.5, 0.5)


def test_summary_may_not_replace_the_runners_metrics():
    class Clashing(MaxRewardScorer):
        def summarize(self, episodes):
            return {"mean_score": 1.0}

    with pytest.raises(ValueError, match=r"\['mean_score'\]"):
        _runner(Clashing()).run(ZeroPolicy())


def test_max_reward_scorer_is_pusht_rule():
    score = MaxRewardScorer().score([0.1, 0.7, 0.4], [{"is_success": False}, {"is_success": True}])
    assert (score.score, score.success, score.extra) == (0.7, True, {})
    assert MaxRewardScorer().score([], []).score == 0.0
