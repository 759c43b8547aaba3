"""BlockPush scoring: p1 and p2 (the paper's), and how often each mode was taken.

An episode's score is the sum of the distinct reward values it saw: 0, 0.49 (a block entered a
zone), 0.51 (both blocks in different zones; rare without the first) or 1.0. p1 = score > 0.4,
p2 = score > 0.9 (the success).

Modes: the first block placed (0 or 1) x the zone block 0 goes to (0 or 1; block 1 goes to the
other). An episode's mode is known once a block is in a zone: the first block and its zone give
the assignment. Mode fractions are over the episodes that placed a block (so the four sum to 1
when any did), for rollouts as for the demonstrations (:func:`demo_mode_fractions`).

Stalls: a policy that loses a block often wanders for the rest of the episode without touching
either; ``idle_steps`` counts an episode's steps after the last one that moved a block, and
``stalled`` is the fraction of episodes that ended unfinished after :data:`STALL_STEPS` of them.

Pace: a policy can place both blocks and still run out of steps. ``effector_step`` is the
pusher's mean travel per step, ``reversals`` the fraction of its moving steps that turn back
(:func:`pace`, for rollouts as for the demonstrations: :func:`demo_pace`), and
``success_steps`` the mean length of the successful episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffusion_policy.envs.blockpush_actions import EFFECTOR_XY
from diffusion_policy.envs.scoring import EpisodeScore, Scorer

if TYPE_CHECKING:
    from diffusion_policy.envs.episodes import EpisodeResult

P1_THRESHOLD = 0.4
P2_THRESHOLD = 0.9
IDLE_MOVE = 0.002  # metres: a step that moves no block farther than this is idle
STALL_STEPS = 100  # an unfinished episode whose last this many steps were idle has stalled
MODES = [(first, zone) for first in (0, 1) for zone in (0, 1)]  # (first block, zone of block 0)
MOVING_STEP = 0.005  # metres: the pusher moves at a step that takes it at least this far
REVERSAL_COS = -0.5  # a moving step turned back more than 120 degrees from the one before


def pace(moves: np.ndarray) -> tuple[float, float]:
    """How fast and how steadily the pusher travels.

    Args:
        moves: (T, 2) the pusher's x, y travel over each step.

    Returns:
        ``(effector_step, reversals)``: the mean travel per step (metres), and the fraction of
        consecutive pairs of moving steps (:data:`MOVING_STEP`) whose directions differ by more
        than 120 degrees (0 when there are none).
    """
    moves = np.asarray(moves, dtype=np.float64).reshape(-1, 2)  # (T, 2)
    if len(moves) == 0:
        return 0.0, 0.0
    length = np.linalg.norm(moves, axis=1)  # (T,)
    moving = moves[length >= MOVING_STEP] / length[length >= MOVING_STEP, None]  # (M, 2) unit
    cos = (moving[1:] * moving[:-1]).sum(axis=1)  # (M - 1,)
    reversals = float(np.mean(cos < REVERSAL_COS)) if len(cos) else 0.0
    return float(length.mean()), reversals


def mode_key(first_block: int, zone_of_block0: int) -> str:
    """The metric name of a mode: ``"mode/b1_first_b0_to_z0"``."""
    return f"mode/b{first_block}_first_b0_to_z{zone_of_block0}"


def zone_of_block0(first_block: int, first_zone: int) -> int:
    """Block 0's zone in the assignment implied by the first block placed and its zone."""
    return first_zone if first_block == 0 else 1 - first_zone


def mode_fractions(first_block: np.ndarray, zone_of_b0: np.ndarray) -> dict[str, float]:
    """Fractions of the episodes in each mode, among those with one (``first_block >= 0``).

    Args:
        first_block: (N,) the first block placed per episode, -1 if none.
        zone_of_b0: (N,) block 0's zone in the episode's assignment (ignored where none).

    Returns:
        ``mode/b0_first`` and ``mode/b0_to_z0`` (the marginals) and the four joint fractions
        (:func:`mode_key`); all 0 if no episode placed a block.
    """
    first_block, zone_of_b0 = np.asarray(first_block), np.asarray(zone_of_b0)
    placed = first_block >= 0
    n = max(int(placed.sum()), 1)
    out = {
        "mode/b0_first": float((placed & (first_block == 0)).sum() / n),
        "mode/b0_to_z0": float((placed & (zone_of_b0 == 0)).sum() / n),
    }
    for first, zone in MODES:
        hits = placed & (first_block == first) & (zone_of_b0 == zone)
        out[mode_key(first, zone)] = float(hits.sum() / n)
    return out


class BlockPushScorer(Scorer):
    """The paper's BlockPush rule; per episode ``extra`` says which block went first and where.

    ``extra``: ``first_block`` (-1 if no block was placed), ``zone_of_block0`` (block 0's zone in
    the episode's assignment, -1 if none), ``block0_zone`` / ``block1_zone`` (the zone each block
    was in at the last step, -1 if none), ``idle_steps`` (steps after the last that moved a
    block). ``summarize`` gives ``p1``, ``p2``, the mode fractions (:func:`mode_fractions`),
    ``idle_steps`` (the mean) and ``stalled`` (the fraction of unfinished episodes with at
    least :data:`STALL_STEPS` idle steps at the end).

    Pace (:func:`pace`): ``extra`` also holds ``effector_step`` and ``reversals``; ``summarize``
    gives their means, and ``success_steps`` (the mean length of the successful episodes) when
    there is one.
    """

    def score(self, rewards: Sequence[float], infos: Sequence[dict[str, Any]]) -> EpisodeScore:
        total = float(sum({round(float(r), 6) for r in rewards if r != 0}))
        first = zone0 = -1
        last = infos[-1] if infos else {}
        for info in infos:
            if int(info.get("first_block", -1)) >= 0:
                first = int(info["first_block"])
                zone0 = zone_of_block0(first, int(info["first_zone"]))
                break
        moved = [float(info.get("block_moved", 0.0)) > IDLE_MOVE for info in infos]
        idle = moved[::-1].index(True) if any(moved) else len(moved)
        step, reversals = pace([info.get("effector_move", (0.0, 0.0)) for info in infos])
        return EpisodeScore(
            score=total,
            success=total > P2_THRESHOLD,
            extra={
                "first_block": first,
                "zone_of_block0": zone0,
                "block0_zone": int(last.get("block0_zone", -1)),
                "block1_zone": int(last.get("block1_zone", -1)),
                "idle_steps": idle,
                "effector_step": step,
                "reversals": reversals,
            },
        )

    def summarize(self, episodes: Sequence[EpisodeResult]) -> dict[str, float]:
        scores = np.array([ep.score for ep in episodes])  # (N,), failed episodes score 0
        first = np.array([ep.extra.get("first_block", -1) for ep in episodes])
        zone0 = np.array([ep.extra.get("zone_of_block0", -1) for ep in episodes])
        idle = np.array([ep.extra.get("idle_steps", 0) for ep in episodes])  # (N,)

        def mean(key: str) -> float:
            return float(np.mean([ep.extra.get(key, 0.0) for ep in episodes]))

        summary = {
            "p1": float(np.mean(scores > P1_THRESHOLD)),
            "p2": float(np.mean(scores > P2_THRESHOLD)),
            **mode_fractions(first, zone0),
            "idle_steps": float(idle.mean()),
            "stalled": float(np.mean((idle >= STALL_STEPS) & (scores <= P2_THRESHOLD))),
            "effector_step": mean("effector_step"),
            "reversals": mean("reversals"),
        }
        lengths = [ep.steps for ep in episodes if ep.score > P2_THRESHOLD]
        if lengths:  # no success, no length to report
            summary["success_steps"] = float(np.mean(lengths))
        return summary


def demo_mode_fractions(path: str | Path) -> dict[str, float]:
    """The mode fractions of the demonstrations in a BlockPush store (see :func:`mode_fractions`).

    Reads ``data/first_block`` and ``data/zone_of_block0`` (constant over each episode).
    """
    from diffusion_policy.data.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.open(path, keys=["first_block", "zone_of_block0"])
    starts = np.concatenate([[0], buffer.episode_ends[:-1]])  # (E,) first step of each episode
    return mode_fractions(buffer["first_block"][starts], buffer["zone_of_block0"][starts])


def demo_pace(path: str | Path) -> dict[str, float]:
    """The demonstrations' pace, for comparison with rollouts' (:func:`pace`).

    Reads ``data/obs`` (the effector's x, y at
    :data:`~diffusion_policy.envs.blockpush_actions.EFFECTOR_XY`) and the episode ends.

    Returns:
        ``effector_step`` and ``reversals``, averaged over episodes, and ``steps`` (the mean
        episode length).
    """
    from diffusion_policy.data.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.open(path, keys=["obs"])
    ends = np.asarray(buffer.episode_ends)  # (E,)
    xy = np.asarray(buffer["obs"][:, list(EFFECTOR_XY)])  # (N, 2)
    paces = [pace(np.diff(episode, axis=0)) for episode in np.split(xy, ends[:-1])]
    step, reversals = np.mean(paces, axis=0)  # (2,) over episodes
    lengths = np.diff(ends, prepend=0)  # (E,)
    return {
        "effector_step": float(step),
        "reversals": float(reversals),
        "steps": float(lengths.mean()),
    }
