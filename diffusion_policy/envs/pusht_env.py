"""Push-T on gym-pusht's simulator, observed exactly as the paper's dataset records it.

gym-pusht (0.1.8) runs the authors' physics; this adapter only changes what is observed and how
an episode starts:

- observations are the dataset's: 9 block keypoints (18,) + agent position (2,), or a 96x96 HWC
  uint8 image + agent position;
- ``reset(seed=s)`` draws the initial state with the paper's legacy numpy generator;
- ``reset(options={"reset_to_state": state, "angle_first": True})`` reproduces a recorded state.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gym_pusht.envs.pusht import PushTEnv as GymPushTEnv
from gym_pusht.envs.pusht import pymunk_to_shapely
from gymnasium import spaces

OBS_TYPES = ("keypoint", "image")

# The 9 block keypoints in the block's frame (pixels, relative to `block.position`, angle 0).
# The original code (PymunkKeypointManager.create_from_pusht_env) made them once: it drew the T
# with pygame at (256, 300), angle 0, took the pixels of its mask as local coordinates
# (col - 256, row - 300), chose 9 of them by farthest-point sampling starting at
# `rng.choice(n_pixels)` with `rng = np.random.default_rng(0)`, and added `rng.uniform(0, 1)`
# to each coordinate. Re-running that procedure on gym-pusht's drawing gives these values
# (tests/envs/test_keypoints.py re-derives them); they also agree to 1e-4 px with the
# per-keypoint mean of `data/keypoint` expressed in the block frame. So they are not vertices of
# the T's shapes but sampled pixels: there are no rounder values to snap to.
BLOCK_KEYPOINTS_LOCAL = np.array(
    [
        [9.269786713763871, 90.04097352393619],
        [-60.983472364471474, -1.1867297607997276],
        [60.91275557727772, -1.3933642242328201],
        [-0.2705034390160016, 25.54362499146542],
        [-14.064927576212233, 122.81585355412153],
        [39.002738500170146, 32.857404276587566],
        [-39.966414424694534, 32.729655446429945],
        [-16.82434437939744, 62.86317892234989],
        [23.54146122024909, -1.7002881094626152],
    ]
)  # (9, 2)


def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """World keypoints of the T from its pose, as the dataset's ``data/keypoint``.

    Args:
        block_pose: (..., 3) block x, y, angle (rad), e.g. ``state[..., 2:5]``.

    Returns:
        (..., 9, 2) keypoints in pixels: ``R(angle) @ local + position``.
    """
    pose = np.asarray(block_pose, dtype=np.float64)
    if pose.shape[-1] != 3:
        raise ValueError(f"block_pose must end in (x, y, angle), got shape {pose.shape}")
    cos, sin = np.cos(pose[..., 2:3]), np.sin(pose[..., 2:3])  # (..., 1)
    lx, ly = BLOCK_KEYPOINTS_LOCAL[:, 0], BLOCK_KEYPOINTS_LOCAL[:, 1]  # (9,)
    x = cos * lx - sin * ly + pose[..., 0:1]  # (..., 9)
    y = sin * lx + cos * ly + pose[..., 1:2]  # (..., 9)
    return np.stack([x, y], axis=-1)  # (..., 9, 2)


def protocol_initial_state(seed: int) -> np.ndarray:
    """The paper's initial state for an episode seed (legacy numpy generator).

    Args:
        seed: Episode seed, e.g. 100000..100049 for the test episodes.

    Returns:
        (5,) float64 agent x, y, block x, y, block angle, as drawn (before the legacy-order
        setting moves the block).
    """
    rs = np.random.RandomState(seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


class PushTEnv(GymPushTEnv):
    """gym-pusht's Push-T with the paper dataset's observations and seeded initial states.

    Observations (``obs_type``):
        ``"keypoint"``: ``{"keypoint": float32 (18,), "agent_pos": float32 (2,)}``, the 9 block
        keypoints flattened as ``data/keypoint.reshape(-1, 18)``; nothing is rendered.
        ``"image"``: ``{"image": uint8 (H, W, 3), "agent_pos": float32 (2,)}``, gym-pusht's
        observation rendering at ``image_size`` (the dataset's ``data/img`` at 96).

    Reset:
        ``reset(seed=s)`` starts from :func:`protocol_initial_state` ``(s)`` set in the legacy
        order (block position, then angle), as the paper's evaluation does. Without a seed the
        episode seed is drawn from the env's generator. ``options={"reset_to_state": state}``
        starts from a given (5,) state instead; add ``"angle_first": True`` to set the block
        angle before its position, which reproduces a recorded dataset state.

    Step:
        reward = clip(coverage / 0.95, 0, 1); terminated when coverage > 0.95; never truncated
        (use ``max_episode_steps`` of :func:`make_pusht_env` or the runner for a time limit).
        ``info`` has ``coverage`` and ``is_success`` besides gym-pusht's entries.

    Args:
        obs_type: ``"keypoint"`` or ``"image"``.
        render_size: Side in pixels of the frames :meth:`render` returns (videos).
        image_size: Side in pixels of the ``"image"`` observation.
    """

    def __init__(self, obs_type: str = "keypoint", render_size: int = 96, image_size: int = 96):
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type={obs_type!r} must be one of {OBS_TYPES}")
        if render_size < 1 or image_size < 1:
            raise ValueError(
                f"render_size={render_size} and image_size={image_size} must be positive"
            )
        super().__init__(
            obs_type=obs_type,
            render_mode="rgb_array",
            observation_width=image_size,
            observation_height=image_size,
            visualization_width=render_size,
            visualization_height=render_size,
        )
        self.episode_seed: int | None = None
        self._goal_geom = None  # the goal T as a shapely polygon, made once

    def _get_coverage(self) -> float:
        # gym-pusht's formula, area(goal & block) / area(goal), but the constant goal polygon is
        # built once instead of every step (a third of a keypoint step's time).
        if self._goal_geom is None:
            goal_body = self.get_goal_pose_body(self.goal_pose)
            self._goal_geom = pymunk_to_shapely(goal_body, self.block.shapes)
        block_geom = pymunk_to_shapely(self.block, self.block.shapes)
        return self._goal_geom.intersection(block_geom).area / self._goal_geom.area

    def _initialize_observation_space(self) -> None:
        agent_pos = spaces.Box(low=0.0, high=512.0, shape=(2,), dtype=np.float32)
        if self.obs_type == "keypoint":
            keypoint = spaces.Box(low=0.0, high=512.0, shape=(18,), dtype=np.float32)
            self.observation_space = spaces.Dict({"keypoint": keypoint, "agent_pos": agent_pos})
        else:
            shape = (self.observation_height, self.observation_width, 3)
            image = spaces.Box(low=0, high=255, shape=shape, dtype=np.uint8)
            self.observation_space = spaces.Dict({"image": image, "agent_pos": agent_pos})

    def get_obs(self) -> dict[str, np.ndarray]:
        """The current observation (see the class docstring)."""
        agent_pos = np.array(self.agent.position, dtype=np.float32)  # (2,)
        if self.obs_type == "keypoint":
            pose = np.array([*self.block.position, self.block.angle])  # (3,)
            keypoint = block_keypoints(pose).reshape(18).astype(np.float32)  # (18,)
            return {"keypoint": keypoint, "agent_pos": agent_pos}
        return {"image": self._render(visualize=False), "agent_pos": agent_pos}

    def get_state(self) -> np.ndarray:
        """(5,) float64 agent x, y, block x, y, block angle (rad, not wrapped)."""
        return np.array([*self.agent.position, *self.block.position, self.block.angle])

    def _set_state(self, state: np.ndarray, angle_first: bool = False) -> None:
        self.agent.position = [float(state[0]), float(state[1])]
        # The angle turns the block about its centre of gravity, which is not the body origin
        # (`block.position`): set last, it moves the position. The paper's seeded reset sets the
        # position first (legacy); a recorded state is reproduced by setting the angle first.
        if angle_first:
            self.block.angle = float(state[4])
            self.block.position = [float(state[2]), float(state[3])]
        else:
            self.block.position = [float(state[2]), float(state[3])]
            self.block.angle = float(state[4])
        self.space.step(self.dt)  # as gym-pusht: one physics step so the state takes effect

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Starts an episode; see the class docstring for ``seed`` and ``options``."""
        gym.Env.reset(self, seed=seed)  # seeds self.np_random; gym-pusht's own draw is skipped
        self._setup()
        options = options or {}
        state = options.get("reset_to_state")
        if state is None:
            if seed is None:
                seed = int(self.np_random.integers(0, 2**31 - 1))
            self.episode_seed = int(seed)
            state, angle_first = protocol_initial_state(seed), False
        else:
            state = np.asarray(state, dtype=np.float64)
            if state.shape != (5,):
                raise ValueError(f"reset_to_state must have shape (5,), got {state.shape}")
            self.episode_seed, angle_first = None, bool(options.get("angle_first", False))
        self._set_state(state, angle_first=angle_first)
        coverage = float(self._get_coverage())
        info = self._get_info()
        info["coverage"] = coverage
        info["is_success"] = coverage > self.success_threshold
        return self.get_obs(), info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Moves the agent's PD target to ``action`` (2,) pixels for one 10 Hz control step."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {action.shape}")
        obs, reward, terminated, truncated, info = super().step(action)
        info["coverage"] = float(info["coverage"])
        info["is_success"] = bool(info["is_success"])
        return obs, float(reward), bool(terminated), bool(truncated), info


def make_pusht_env(
    obs_type: str = "keypoint",
    render_size: int = 96,
    image_size: int = 96,
    max_episode_steps: int | None = None,
) -> gym.Env:
    """Builds a :class:`PushTEnv`; picklable arguments, so usable as a vector-env factory.

    Args:
        obs_type: ``"keypoint"`` or ``"image"``.
        render_size: Side in pixels of :meth:`PushTEnv.render` frames.
        image_size: Side in pixels of the image observation.
        max_episode_steps: Truncate episodes after this many steps (TimeLimit) if given.

    Returns:
        The environment, wrapped in ``gymnasium.wrappers.TimeLimit`` if ``max_episode_steps``.
    """
    env: gym.Env = PushTEnv(obs_type=obs_type, render_size=render_size, image_size=image_size)
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps)
    return env
