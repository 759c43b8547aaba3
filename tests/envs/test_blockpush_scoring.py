"""BlockPush scoring on hand-made episodes, and through the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_policy.envs.blockpush_runner import BlockPushRunner
from diffusion_policy.envs.blockpush_scoring import BlockPushScorer, mode_fractions, pace
from diffusion_policy.envs.episodes import EpisodeResult


def _info(
    b0: int = -1,
    b1: int = -1,
    first: int = -1,
    first_zone: int = -1,
    moved: float = 0.0,
    move: tuple[float, float] = (0.0, 0.0),
) -> dict:
    both = b0 >= 0 and b1 >= 0 and b0 != b1
    return {
        "block0_zone": b0, "block1_zone": b1, "first_block": first, "first_zone": first_zone,
        "is_success": both, "block_moved": moved, "effector_move": np.array(move),
    }  # fmt: skip


def test_nothing_placed_scores_zero():
    s = BlockPushScorer().score([0.0] * 5, [_info()] * 5)
    assert (s.score, s.success) == (0.0, False)
    none = {"first_block": -1, "zone_of_block0": -1, "block0_zone": -1, "block1_zone": -1}
    still = {"effector_step": 0.0, "reversals": 0.0}
    assert s.extra == {**none, "idle_steps": 5, **still}  # nothing ever moved


def test_one_block_placed_is_p1_only():
    # Block 1 enters zone 0 at step 2, stays: block 0 would go to zone 1.
    infos = [_info(), _info(-1, 0, 1, 0), _info(-1, 0, 1, 0)]
    s = BlockPushScorer().score([0.0, 0.49, 0.0], infos)
    assert s.score == pytest.approx(0.49) and not s.success
    assert (s.extra["first_block"], s.extra["zone_of_block0"]) == (1, 1)
    assert (s.extra["block0_zone"], s.extra["block1_zone"]) == (-1, 0)


def test_both_placed_counts_distinct_values_once():
    infos = [_info(0, -1, 0, 0), _info(0, -1, 0, 0), _info(0, 1, 0, 0), _info(0, 1, 0, 0)]
    s = BlockPushScorer().score([0.49, 0.0, 0.51, 0.51], infos)
    assert s.score == pytest.approx(1.0) and s.success
    assert (s.extra["first_block"], s.extra["zone_of_block0"]) == (0, 0)


def test_both_at_once_is_a_success():
    s = BlockPushScorer().score([0.0, 1.0], [_info(), _info(1, 0, 0, 1)])
    assert s.score == pytest.approx(1.0) and s.success
    assert s.extra["zone_of_block0"] == 1


def test_a_block_pushed_out_again_still_scored_p1():
    infos = [_info(0, -1, 0, 0), _info(-1, -1, 0, 0)]
    s = BlockPushScorer().score([0.49, 0.0], infos)
    assert s.score == pytest.approx(0.49) and not s.success


def test_idle_steps_count_from_the_last_step_that_moved_a_block():
    moves = [0.0, 0.01, 0.003, 0.001, 0.0, 0.0015]  # moves of more than 2 mm at steps 1, 2
    s = BlockPushScorer().score([0.0] * 6, [_info(moved=m) for m in moves])
    assert s.extra["idle_steps"] == 3


def test_pace_is_travel_per_step_and_the_share_of_moving_steps_that_turn_back():
    # Moving steps +x, -x (back), +x (back), +y (a right angle: not a reversal); a 1 mm step
    # is not moving and does not break the sequence.
    moves = np.array([[0.02, 0.0], [-0.02, 0.0], [0.001, 0.0], [0.01, 0.0], [0.0, 0.03]])
    step, reversals = pace(moves)
    assert step == pytest.approx((0.02 + 0.02 + 0.001 + 0.01 + 0.03) / 5)
    assert reversals == pytest.approx(2 / 3)
    assert pace(np.zeros((0, 2))) == (0.0, 0.0)
    assert pace([[0.03, 0.0]] * 4) == (pytest.approx(0.03), 0.0)  # straight on


def test_score_and_summary_carry_the_pace():
    moves = [(0.02, 0.0), (-0.02, 0.0), (0.02, 0.0)]
    infos = [_info(move=m) for m in moves[:2]] + [_info(0, 1, 0, 0, move=moves[2])]
    done = BlockPushScorer().score([0.0, 0.0, 1.0], infos)
    assert done.extra["reversals"] == pytest.approx(1.0)
    assert done.extra["effector_step"] == pytest.approx(0.02)
    slow = BlockPushScorer().score([0.0] * 5, [_info(move=(0.01, 0.0))] * 5)
    episodes = [
        EpisodeResult(0, "test", score=s.score, success=s.success, steps=n, extra=s.extra)
        for s, n in ((done, 3), (slow, 5))
    ]
    m = BlockPushScorer().summarize(episodes)
    assert m["effector_step"] == pytest.approx(0.015) and m["reversals"] == pytest.approx(0.5)
    assert m["success_steps"] == 3  # the unfinished episode's 5 steps are not a success's
    assert "success_steps" not in BlockPushScorer().summarize(episodes[1:])


def test_summary_counts_unfinished_episodes_that_ended_idle_as_stalled():
    def ep(score: float, idle: int) -> EpisodeResult:
        return EpisodeResult(
            seed=0, split="test", score=score, extra={"first_block": -1, "idle_steps": idle}
        )

    episodes = [ep(0.49, 150), ep(0.0, 100), ep(0.0, 99), ep(1.0, 0)]
    m = BlockPushScorer().summarize(episodes)
    assert m["stalled"] == pytest.approx(2 / 4)
    assert m["idle_steps"] == pytest.approx(349 / 4)


def _episode(score: float, first: int, zone0: int) -> EpisodeResult:
    extra = {"first_block": first, "zone_of_block0": zone0}
    return EpisodeResult(seed=0, split="test", score=score, success=score > 0.9, extra=extra)


def test_summary_gives_p1_p2_and_mode_fractions_over_placed_episodes():
    episodes = [
        _episode(1.0, 0, 0), _episode(1.0, 0, 1), _episode(0.49, 1, 0), _episode(1.0, 0, 0),
        _episode(0.0, -1, -1),
        EpisodeResult(seed=9, split="test", failed=True, error="boom"),  # extra {}
    ]  # fmt: skip
    m = BlockPushScorer().summarize(episodes)
    assert (m["p1"], m["p2"]) == pytest.approx((4 / 6, 3 / 6))
    assert m["mode/b0_first"] == pytest.approx(3 / 4)
    assert m["mode/b0_to_z0"] == pytest.approx(3 / 4)
    assert m["mode/b0_first_b0_to_z0"] == pytest.approx(2 / 4)
    assert m["mode/b0_first_b0_to_z1"] == pytest.approx(1 / 4)
    assert m["mode/b1_first_b0_to_z0"] == pytest.approx(1 / 4)
    assert m["mode/b1_first_b0_to_z1"] == 0.0


def test_mode_fractions_without_placed_episodes_are_zero():
    assert set(mode_fractions([-1, -1], [-1, -1]).values()) == {0.0}


class StillPolicy:
    def predict_action(self, obs):
        return {"action": torch.zeros(obs["obs"].shape[0], 8, 2)}


def test_runner_logs_p1_p2_and_modes():
    runner = BlockPushRunner(
        n_test=2, n_train=1, max_steps=8, n_envs=3, progress=False, render_size=32
    )
    result = runner.run(StillPolicy())
    assert (result["test/p1"], result["test/p2"], result["train/p2"]) == (0.0, 0.0, 0.0)
    assert result["test/mode/b0_first"] == 0.0
    assert [e["steps"] for e in result["per_episode"]] == [8, 8, 8]
    assert result["per_episode"][0]["extra"]["first_block"] == -1
    assert result["per_episode"][0]["extra"]["idle_steps"] == 8  # it never touched a block
    assert result["test/stalled"] == 0.0  # 8 steps are too few to call it a stall
