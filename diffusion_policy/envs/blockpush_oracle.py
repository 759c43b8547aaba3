"""The scripted BlockPush oracle, and the demonstration store it writes.

The oracle is a policy over the env's 16-value observation. Per episode it draws a *mode*: which
block goes first and which zone block 0 goes to (block 1 takes the other), then for each block in
turn:

1. approach: go to the pre-push point, :data:`PREPUSH_DIST` behind the block on the zone->block
   line, around the blocks (both are obstacles: the target block must not be knocked before the
   push, the placed one must stay in its zone);
2. orient: if none of the block's faces is within :data:`ORIENT_START` of square to the
   block->zone line, push one side of the block, slowly, to turn it until one is within
   :data:`ORIENT_DONE`; then back to 1 (as the Implicit BC oracle does: a point pusher keeps a
   block pushed face-on in front of it, while a block pushed at an angle turns and slips off
   within a few steps);
3. push: move along the block->zone line at a capped speed, aiming through the block's centre;
   if the effector drifts off that line or the block turns past :data:`ORIENT_START`, go
   back to 1;
4. when the block is in its zone, back off and take the next block.

Noise: each action gets Gaussian noise, and the speed cap is drawn per episode.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion_policy.data.blockpush_dataset import DEFAULT_BLOCKPUSH_PATH
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.envs.blockpush_actions import EFFECTOR_XY, MAX_MOVE, TARGET_XY
from diffusion_policy.envs.blockpush_env import (
    BLOCK_SIZE,
    BLOCK_XY,
    BLOCK_YAW,
    MAX_EPISODE_STEPS,
    PUSHER_RADIUS,
    ZONE_XY,
    BlockPushEnv,
)

log = logging.getLogger(__name__)

PREPUSH_DIST = 0.06  # block centre to pusher centre at the pre-push point (~3 cm gap)
CONTACT_DIST = BLOCK_SIZE / 2 + PUSHER_RADIUS  # block centre to pusher centre, face contact
# Blocks are circles of this radius for the approach: the cube's half-diagonal, the pusher and
# a margin.
OBSTACLE_RADIUS = BLOCK_SIZE / math.sqrt(2) + PUSHER_RADIUS + 0.012
AT_POINT = 0.008  # the pre-push point is reached within this distance
OFF_LINE = 0.015  # re-aim when the effector is this far off the block->zone line
PLACED = 0.015  # a block this close to its zone's centre is done (the env counts 5 cm)
APPROACH_SPEED = 0.05  # metres per step when not pushing
SPEED_RANGE = (0.025, 0.035)  # push speed cap per step (0.25..0.35 m/s at 10 Hz)
ACTION_NOISE = 0.002  # std of the Gaussian noise on each action, metres
ORIENT_START = math.radians(15)  # turn the block first when its faces are this far off the push
ORIENT_DONE = math.radians(3)  # ... until a face is this close to square
ORIENT_RADIUS = 0.025  # orienting aims this far from the block's centre (inside its contact)
ORIENT_TURN = 0.15  # ... at the effector's bearing from the block turned by this (radians)
ORIENT_SPEED = 0.015  # metres per step while orienting
NEAR_ZONE = 0.05  # a block this close to its zone is pushed in without orienting
# Detours (``detour_prob``): the executed moves head for a random point of this region for a
# random number of steps, at the approach speed; the oracle's own moves are recorded.
DETOUR_REGION = ((0.2, -0.4), (0.6, 0.25))  # (x, y) low, high: around the blocks and zones
DETOUR_STEPS = (3, 10)
# Drifts (``drift_prob``): while pushing, the executed moves carry a constant sideways offset of
# this size (metres per step) for a random number of steps, as a policy's systematic error does.
DRIFT_OFFSET = (0.005, 0.015)
DRIFT_STEPS = (3, 8)


@dataclass(frozen=True)
class Mode:
    """Which block goes first, and which zone block 0 goes to (block 1 goes to the other)."""

    first_block: int
    zone_of_block0: int

    def zone_of(self, block: int) -> int:
        return self.zone_of_block0 if block == 0 else 1 - self.zone_of_block0


class BlockPushOracle:
    """Pushes both blocks into distinct zones in a mode drawn from ``rng``.

    Args:
        rng: Draws the mode, the push speed and the action noise.
        mode: The mode to use instead of a random one.
    """

    def __init__(self, rng: np.random.Generator, mode: Mode | None = None) -> None:
        self.rng = rng
        self.mode = mode or Mode(int(rng.integers(2)), int(rng.integers(2)))
        self.push_speed = float(rng.uniform(*SPEED_RANGE))
        self.order = (self.mode.first_block, 1 - self.mode.first_block)
        self._k = 0  # index in `order` of the block being pushed
        self._phase = "approach"

    @property
    def phase(self) -> str:
        """What the oracle is doing: "approach", "orient", "push" or "retreat"."""
        return self._phase

    @property
    def block(self) -> int | None:
        """The block being placed, or None when both are."""
        return self.order[self._k] if self._k < 2 else None

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The (2,) action (dx, dy) for a (16,) observation."""
        obs = np.asarray(obs, dtype=np.float64)
        blocks = [obs[list(ix)] for ix in BLOCK_XY]  # 2 x (2,)
        effector, target = obs[list(EFFECTOR_XY)], obs[list(TARGET_XY)]
        if self._k >= 2:
            return np.zeros(2, dtype=np.float32)
        block = self.order[self._k]
        zone = obs[list(ZONE_XY[self.mode.zone_of(block)])]
        b = blocks[block]
        to_zone = zone - b
        if np.linalg.norm(to_zone) < PLACED:
            self._k += 1
            self._phase = "retreat"
            if self._k >= 2:
                return np.zeros(2, dtype=np.float32)
            return self.act(obs)
        d = to_zone / np.linalg.norm(to_zone)  # (2,) block -> zone
        error = face_error(obs[BLOCK_YAW[block]], d)  # radians from a face square to d
        misaligned = abs(error) > ORIENT_START and np.linalg.norm(to_zone) > NEAR_ZONE

        if self._phase == "retreat":  # clear the block just placed before planning around it
            placed = blocks[self.order[self._k - 1]]
            away = target - placed
            dist = np.linalg.norm(away)
            if dist < OBSTACLE_RADIUS + 0.01:
                return self._noisy(away / max(dist, 1e-6) * APPROACH_SPEED)
            self._phase = "approach"

        prepush = b - d * PREPUSH_DIST
        if self._phase == "orient":
            if abs(error) < ORIENT_DONE or np.linalg.norm(to_zone) <= NEAR_ZONE:
                self._phase = "approach"
            else:  # push beside the centre, on the side that turns a face square to d
                bearing = (effector - b) / max(np.linalg.norm(effector - b), 1e-6)
                spot = b + _rotated(bearing, math.copysign(ORIENT_TURN, error)) * ORIENT_RADIUS
                return self._noisy(_capped(spot - target, ORIENT_SPEED))
        if self._phase == "push":
            rel = effector - b
            off_line = abs(d[0] * rel[1] - d[1] * rel[0])
            # Drifted, ended up beside the block, or the block turned: start over.
            if off_line > OFF_LINE or rel @ d > 0 or misaligned:
                self._phase = "approach"
        if self._phase == "approach":
            if (
                np.linalg.norm(target - prepush) < AT_POINT
                and np.linalg.norm(effector - prepush) < 2 * AT_POINT
            ):
                if misaligned:
                    self._phase = "orient"
                    return self.act(obs)
                self._phase = "push"
            else:
                waypoint = _detour(target, prepush, blocks)
                return self._noisy(_capped(waypoint - target, APPROACH_SPEED))
        # Push: aim the effector through the block's centre along d, slower near the zone.
        step = min(self.push_speed, 0.5 * np.linalg.norm(to_zone) + 0.01)
        goal = b - d * (CONTACT_DIST - step)
        return self._noisy(_capped(goal - target, self.push_speed))

    def _noisy(self, action: np.ndarray) -> np.ndarray:
        return _env_move(action + self.rng.normal(0.0, ACTION_NOISE, 2))


def face_error(yaw: float, direction: np.ndarray) -> float:
    """The angle (radians, in [-pi/4, pi/4)) from the nearest face normal of a cube at ``yaw``
    to ``direction`` (2,): 0 when a face is square to it."""
    angle = math.atan2(direction[1], direction[0]) - yaw
    return (angle + math.pi / 4) % (math.pi / 2) - math.pi / 4


def _rotated(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _env_move(move: np.ndarray) -> np.ndarray:
    """``move`` as the env takes it: float32, each axis within :data:`MAX_MOVE`."""
    return np.clip(move, -MAX_MOVE, MAX_MOVE).astype(np.float32)


def _capped(move: np.ndarray, speed: float) -> np.ndarray:
    norm = np.linalg.norm(move)
    return move if norm <= speed else move * (speed / norm)


def _detour(start: np.ndarray, goal: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """The next point on the way from ``start`` to ``goal`` around the blocks (circles).

    If the straight segment passes through a block's circle, the point beside that block (on
    the segment's side of it) just outside the circle; else ``goal``.
    """
    seg = goal - start
    length2 = float(seg @ seg)
    best, best_t = goal, math.inf
    for c in blocks:
        t = 0.0 if length2 == 0 else float(np.clip((c - start) @ seg / length2, 0.0, 1.0))
        closest = start + t * seg
        gap = closest - c
        dist = np.linalg.norm(gap)
        if dist >= OBSTACLE_RADIUS or t >= 1.0:
            continue
        if dist < 1e-6:  # straight through the centre: go round on the left of the segment
            gap = np.array([-seg[1], seg[0]])
            dist = np.linalg.norm(gap)
        if t < best_t:
            best_t = t
            best = c + gap / dist * OBSTACLE_RADIUS * 1.25
    return best


@dataclass
class OracleEpisode:
    """One oracle episode: the observation before each action, the actions, the outcome."""

    obs: np.ndarray  # (T, 16) float32
    action: np.ndarray  # (T, 2) float32
    success: bool
    mode: Mode


def run_oracle_episode(
    env: BlockPushEnv,
    seed: int,
    max_steps: int = MAX_EPISODE_STEPS,
    exec_noise: float = 0.0,
    detour_prob: float = 0.0,
    drift_prob: float = 0.0,
) -> OracleEpisode:
    """Runs the oracle on the episode ``seed`` (the env's layout and the oracle's draws).

    Args:
        env: The env to run in.
        seed: The episode's seed.
        max_steps: Steps before the episode counts as failed.
        exec_noise: Std (metres) of Gaussian noise added to each move the env *executes*;
            the episode records the oracle's own move. The states then stray from the
            oracle's path and the actions recorded there are its corrections (DART-style
            demonstrations: a policy learns to recover, not only to follow).
        detour_prob: Chance per step that the env executes a detour instead of the oracle's
            moves: :data:`DETOUR_STEPS` moves toward a random point of :data:`DETOUR_REGION`
            (the recorded moves stay the oracle's, so the episode shows how it comes back from
            far off its path, e.g. from the zone side of a block it lost).
        drift_prob: Chance per pushing step (outside detours) that the executed moves drift:
            for :data:`DRIFT_STEPS` steps each gets the same offset, across the push and of a
            size in :data:`DRIFT_OFFSET`, so the pusher slides off the block's line and the
            episode shows the oracle winning the block back (or re-aiming before it is lost).

    Returns:
        The steps taken until success or ``max_steps``.
    """
    obs, _ = env.reset(seed=seed)
    oracle = BlockPushOracle(np.random.default_rng([seed, 1]))
    exec_rng = np.random.default_rng([seed, 2])
    observations, actions = [], []
    success = False
    detour_left, detour_goal = 0, np.zeros(2)
    drift_left, drift = 0, np.zeros(2)
    for _ in range(max_steps):
        action = oracle.act(obs)
        observations.append(obs)
        actions.append(action)
        if detour_left == 0 and detour_prob > 0 and exec_rng.random() < detour_prob:
            detour_left = int(exec_rng.integers(DETOUR_STEPS[0], DETOUR_STEPS[1] + 1))
            detour_goal = exec_rng.uniform(*DETOUR_REGION)
        pushing = oracle.phase == "push" and detour_left == 0
        if drift_left == 0 and pushing and drift_prob > 0 and exec_rng.random() < drift_prob:
            drift_left = int(exec_rng.integers(DRIFT_STEPS[0], DRIFT_STEPS[1] + 1))
            across = _rotated(action / max(np.linalg.norm(action), 1e-6), math.pi / 2)
            drift = across * exec_rng.choice([-1.0, 1.0]) * exec_rng.uniform(*DRIFT_OFFSET)
        if detour_left > 0:
            detour_left -= 1
            move = _capped(detour_goal - obs[list(TARGET_XY)], APPROACH_SPEED)
            action = move.astype(np.float32)
        elif drift_left > 0:
            drift_left -= 1
            action = _env_move(action + drift)
        elif exec_noise > 0:
            action = _env_move(action + exec_rng.normal(0.0, exec_noise, 2))
        obs, _, terminated, _, info = env.step(action)
        if terminated:
            success = bool(info["is_success"])
            break
    return OracleEpisode(np.stack(observations), np.stack(actions), success, oracle.mode)


def generate_blockpush(
    path: str | Path = DEFAULT_BLOCKPUSH_PATH,
    n_episodes: int = 1000,
    seed: int = 0,
    progress: bool = True,
    exec_noise: float = 0.0,
    layout: str = "paper",
    detour_prob: float = 0.0,
    drift_prob: float = 0.0,
) -> dict[str, float]:
    """Writes ``n_episodes`` successful oracle episodes to a zarr store (atomically).

    Episode seeds run ``seed, seed + 1, ...``; a failed episode is dropped and the next seed
    taken, so the store is deterministic for ``(n_episodes, seed)``.

    Keys: ``data/obs`` (T, 16) float32, ``data/action`` (T, 2) float32, and the episode's mode
    repeated per step (the replay buffer holds per-step arrays only): ``data/first_block`` and
    ``data/zone_of_block0`` (T,) int8.

    ``exec_noise``, ``detour_prob`` and ``drift_prob`` perturb the executed moves, not the
    recorded ones (see :func:`run_oracle_episode`). ``layout`` is the env's initial poses
    (``"paper"`` or ``"wide"``).

    Returns:
        ``{"n_episodes", "n_tried", "oracle_success_rate", "seconds", "n_steps"}``.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes={n_episodes} must be >= 1")
    if exec_noise < 0:
        raise ValueError(f"exec_noise={exec_noise} must be >= 0")
    if not 0 <= detour_prob < 1:
        raise ValueError(f"detour_prob={detour_prob} must be in [0, 1)")
    if not 0 <= drift_prob < 1:
        raise ValueError(f"drift_prob={drift_prob} must be in [0, 1)")
    env = BlockPushEnv(layout=layout)
    buffer = ReplayBuffer.create_empty()
    tried = 0
    tic = time.perf_counter()
    with tqdm(total=n_episodes, desc="blockpush oracle", unit="ep", disable=not progress) as bar:
        while buffer.n_episodes < n_episodes:
            ep = run_oracle_episode(
                env,
                seed + tried,
                exec_noise=exec_noise,
                detour_prob=detour_prob,
                drift_prob=drift_prob,
            )
            tried += 1
            if not ep.success:
                continue
            n = len(ep.action)
            buffer.add_episode(
                {
                    "obs": ep.obs,
                    "action": ep.action,
                    "first_block": np.full(n, ep.mode.first_block, dtype=np.int8),
                    "zone_of_block0": np.full(n, ep.mode.zone_of_block0, dtype=np.int8),
                }
            )
            bar.update(1)
            bar.set_postfix(success=f"{buffer.n_episodes / tried:.3f}")
    env.close()
    buffer.save(path)
    seconds = time.perf_counter() - tic
    log.info("wrote %d BlockPush episodes (%d tried) to %s", n_episodes, tried, path)
    return {
        "n_episodes": n_episodes,
        "n_tried": tried,
        "oracle_success_rate": n_episodes / tried,
        "seconds": seconds,
        "n_steps": buffer.n_steps,
    }


def ensure_blockpush_dataset(
    path: str | Path = DEFAULT_BLOCKPUSH_PATH,
    n_episodes: int = 1000,
    seed: int = 0,
    layout: str = "paper",
    detour_prob: float = 0.0,
    drift_prob: float = 0.0,
) -> Path:
    """Returns the BlockPush store at ``path``, generating it with the oracle if absent."""
    path = Path(path).expanduser()
    if not path.exists():
        log.info(
            "no BlockPush store at %s: generating %d oracle episodes (%s layout, detours %g, "
            "drifts %g)",
            path,
            n_episodes,
            layout,
            detour_prob,
            drift_prob,
        )
        generate_blockpush(
            path,
            n_episodes=n_episodes,
            seed=seed,
            layout=layout,
            detour_prob=detour_prob,
            drift_prob=drift_prob,
        )
    return path
