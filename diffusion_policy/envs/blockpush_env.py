"""BlockPush: an xArm6 pushes two blocks into two target zones, on pybullet (headless).

The paper's multimodal BlockPush task (Implicit BC's setting, see ``docs/tasks.md``), built here
from scratch on pybullet in DIRECT mode:

- a table (plane) and an xArm6 at the origin whose end effector is a vertical cylinder pusher
  moving in the table plane, 6 cm above it (its flange);
- two 4 cm cube blocks (red, block 0; blue, block 1) and two flat target zones (visual markers,
  no collision);
- control at 10 Hz: an action moves the effector *target* by (dx, dy) metres, each within
  [-0.1, 0.1] (the paper's relative action), or with ``abs_action`` names the next target
  itself (x, y), reached by the same capped move; the physics then runs :data:`SUBSTEPS` fixed
  substeps of 1/240 s.

How the effector moves: the pusher cylinder is a dynamic rigid body held by a fixed constraint
whose pivot slides linearly from the old target to the new one over the substeps, with a capped
force; so it pushes the blocks through real contacts and is stopped by them. The arm follows the
pusher by inverse kinematics once per control step, kinematically (its joints are set, its links
have no collisions): full position control of six joints through contacts was slower and less
stable, and the arm plays no part in the pushing.

Observation (16 float32, the paper's order): block 0 x, y, yaw; block 1 x, y, yaw; effector x, y;
effector target x, y; zone 0 x, y, yaw; zone 1 x, y, yaw. Metres and radians, robot base frame.

Reward: 0.49 at the first step any block is in any zone (its centre within :data:`ZONE_RADIUS` of
the zone's centre), and 0.51 at each step both blocks are in different zones, which ends the
episode (``terminated``; ``info["is_success"]``). ``info`` also says which zone each block is in,
which block entered a zone first (the modes the scorer counts) and how far the blocks moved in
the step (``block_moved``, metres: the scorer counts the idle steps at an episode's end), and
the pusher's travel (``effector_move``, (2,) metres: the scorer's pace).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet as pb
import pybullet_data
from gymnasium import spaces

from diffusion_policy.envs.blockpush_actions import (
    MAX_MOVE,
    WORKSPACE_X,
    WORKSPACE_Y,
    next_target,
)

CONTROL_HZ = 10
PHYSICS_HZ = 240
SUBSTEPS = PHYSICS_HZ // CONTROL_HZ
MAX_EPISODE_STEPS = 350

ZONE_RADIUS = 0.05  # a block whose centre is this close to a zone's centre is in it
FIRST_REWARD = 0.49  # the first time any block enters any zone
BOTH_REWARD = 0.51  # both blocks in different zones

BLOCK_SIZE = 0.04  # cube side
BLOCK_MASS = 0.1
PUSHER_RADIUS = 0.0125
PUSHER_LENGTH = 0.05
EFFECTOR_HEIGHT = 0.06  # the flange; the cylinder hangs from it down to 1 cm above the table
PUSHER_MAX_FORCE = 20.0  # newtons the constraint may use to drag the pusher to its target
# Lateral friction of the pusher (the paper's pusher tip: 1.0; pybullet multiplies it by the
# block's 0.5). A block pushed a little off-centre stays in front for 7.9 steps on average
# against 6.6 at 0.2, and the CPU recipe placed more blocks (docs/tasks.md).
PUSHER_FRICTION = 1.0

# Initial layouts (``layout=``). "paper": the paper's (Implicit BC's multimodal BlockPush): both
# blocks, any yaw, in a 20 x 30 cm region on the near side of the table, at least PAPER_BLOCK_DX
# apart in x; the two zones side by side on the far side, their left/right order drawn, each
# jittered by millimetres; the effector starts beside the blocks.
PAPER_BLOCK_X, PAPER_BLOCK_Y = (0.3, 0.5), (-0.35, -0.05)
PAPER_BLOCK_DX = 0.1
PAPER_ZONE_X, PAPER_ZONE_Y = (0.28, 0.52), 0.2
PAPER_ZONE_JITTER = (0.005, 0.0075)  # x, y
PAPER_ZONE_YAW = math.pi / 30  # zone yaws within +-6 degrees
# "wide" (ours, harder): blocks in a near band and zones in a far band, 60 cm wide, any yaws,
# kept apart so the task is well-posed.
BLOCK_X, BLOCK_Y = (0.3, 0.42), (-0.3, 0.3)
ZONE_X, ZONE_Y = (0.52, 0.64), (-0.3, 0.3)
MIN_BLOCK_GAP = 0.15  # between the blocks' centres
MIN_ZONE_GAP = 0.22  # between the zones' centres
MIN_BLOCK_ZONE_GAP = 0.14  # between any block and any zone
EFFECTOR_START = {"paper": (0.3, -0.4), "wide": (0.2, 0.0)}
LAYOUTS = tuple(EFFECTOR_START)

BLOCK_COLORS = ((0.85, 0.15, 0.15, 1.0), (0.15, 0.3, 0.85, 1.0))
ZONE_COLORS = ((0.95, 0.85, 0.3, 1.0), (0.4, 0.85, 0.4, 1.0))
ZONE_SIDE = 0.1  # the marker's side (a square, for looks: "in" is the 5 cm radius)

OBS_DIM = 16
# Observation indices (FACTS: x at 0, 3, 6, 8, 10, 13; y at 1, 4, 7, 9, 11, 14).
BLOCK_XY = ((0, 1), (3, 4))
BLOCK_YAW = (2, 5)
# The effector's x, y (6, 7) and its target's (8, 9): blockpush_actions' EFFECTOR_XY, TARGET_XY
ZONE_XY = ((10, 11), (13, 14))
INFO_KEYS = (
    "block0_zone", "block1_zone", "first_block", "first_zone", "is_success", "block_moved",
    "effector_move",
)  # fmt: skip


def wrap_angle(angle: float) -> float:
    """An angle in radians wrapped to [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def check_layout(layout: str) -> str:
    """``layout`` if it names one of :data:`LAYOUTS`, else a ValueError that lists them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown BlockPush layout {layout!r}; choose one of {list(LAYOUTS)}")
    return layout


def sample_layout(rng: np.random.Generator, layout: str = "paper") -> dict[str, np.ndarray]:
    """Draws block and zone poses for ``layout`` ("paper" or "wide", see :data:`LAYOUTS`).

    Returns:
        ``{"blocks": (2, 3), "zones": (2, 3)}`` x, y, yaw.
    """
    sample = _paper_layout if check_layout(layout) == "paper" else _wide_layout
    for _ in range(10_000):
        if (found := sample(rng)) is not None:
            return found
    raise RuntimeError("could not sample a BlockPush layout in 10000 draws; check the ranges")


def _paper_layout(rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One draw of the paper's layout, or None when the blocks are too close in x."""
    xs, ys = rng.uniform(*PAPER_BLOCK_X, 2), rng.uniform(*PAPER_BLOCK_Y, 2)
    blocks = np.stack([xs, ys, rng.uniform(-math.pi, math.pi, 2)], axis=1)  # (2, 3)
    if abs(blocks[0, 0] - blocks[1, 0]) < PAPER_BLOCK_DX:
        return None
    order = list(PAPER_ZONE_X) if rng.random() < 0.5 else list(PAPER_ZONE_X)[::-1]
    jx, jy = PAPER_ZONE_JITTER
    zones = np.stack(
        [
            np.array(order) + rng.uniform(-jx, jx, 2),
            PAPER_ZONE_Y + rng.uniform(-jy, jy, 2),
            rng.uniform(-PAPER_ZONE_YAW, PAPER_ZONE_YAW, 2),
        ],
        axis=1,
    )  # (2, 3)
    return {"blocks": blocks, "zones": zones}


def _wide_layout(rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One draw of the wide layout, or None when it breaks one of the ``MIN_*_GAP``."""
    blocks = np.stack([rng.uniform(*BLOCK_X, 2), rng.uniform(*BLOCK_Y, 2)], axis=1)  # (2, 2)
    zones = np.stack([rng.uniform(*ZONE_X, 2), rng.uniform(*ZONE_Y, 2)], axis=1)  # (2, 2)
    yaws = rng.uniform(-math.pi, math.pi, 4)  # (4,)
    gaps = np.linalg.norm(blocks[:, None] - zones[None], axis=-1)  # (2, 2)
    if (
        np.linalg.norm(blocks[0] - blocks[1]) < MIN_BLOCK_GAP
        or np.linalg.norm(zones[0] - zones[1]) < MIN_ZONE_GAP
        or gaps.min() < MIN_BLOCK_ZONE_GAP
    ):
        return None
    return {
        "blocks": np.concatenate([blocks, yaws[:2, None]], axis=1),
        "zones": np.concatenate([zones, yaws[2:, None]], axis=1),
    }


class BlockPushEnv(gym.Env):
    """Two blocks, two zones, an xArm6 pusher; see the module docstring for the whole setting.

    ``reset(seed=s)`` rebuilds the world and draws the layout from ``s`` (same seed, same
    episode: the physics is deterministic). ``step(action)`` takes ``(dx, dy)`` metres, clipped to
    [-0.1, 0.1]; the target is kept in the workspace. Episodes end on success (``terminated``);
    use ``max_episode_steps`` of :func:`make_blockpush_env` or the runner's ``max_steps`` for the
    350-step limit.

    Args:
        render_size: Side in pixels of the frames :meth:`render` returns (TinyRenderer).
        abs_action: Actions are the next target (x, y) rather than a move (dx, dy); the target
            still moves at most ``MAX_MOVE`` per step and stays in the workspace.
        layout: How initial poses are drawn: "paper" (the paper's) or "wide" (see
            :data:`LAYOUTS` and :func:`sample_layout`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self, render_size: int = 96, abs_action: bool = False, layout: str = "paper"
    ) -> None:
        if render_size < 1:
            raise ValueError(f"render_size={render_size} must be positive")
        self.render_mode = "rgb_array"
        self.render_size = render_size
        self.abs_action = abs_action
        self.layout_name = check_layout(layout)
        self._start = np.array(EFFECTOR_START[layout], dtype=np.float64)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
        if abs_action:
            low, high = [WORKSPACE_X[0], WORKSPACE_Y[0]], [WORKSPACE_X[1], WORKSPACE_Y[1]]
            self.action_space = spaces.Box(np.float32(low), np.float32(high), dtype=np.float32)
        else:
            self.action_space = spaces.Box(-MAX_MOVE, MAX_MOVE, shape=(2,), dtype=np.float32)
        self._client = pb.connect(pb.DIRECT)
        self._layout: dict[str, np.ndarray] | None = None
        self._target = self._start.copy()
        self._first_block = -1
        self._first_zone = -1
        self._block_xy = np.zeros((2, 2))  # the blocks' x, y after the last step
        self._effector = np.zeros(2)  # the pusher's x, y after the last step

    # -- gym API ----------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts an episode with a layout drawn from ``seed`` (or the env's generator)."""
        super().reset(seed=seed)
        self._layout = sample_layout(self.np_random, self.layout_name)
        self._build_world(self._layout)
        self._target = self._start.copy()
        self._first_block, self._first_zone = -1, -1
        self._follow_with_arm()
        blocks = self.block_poses()  # (2, 3)
        self._block_xy = blocks[:, :2]
        self._effector = self.effector_xy()
        info = self._info(self._block_zones(self._block_xy), moved=0.0, move=np.zeros(2))
        return self._obs(blocks), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Moves the effector target by ``action`` (dx, dy), or toward it with ``abs_action``,
        and runs 0.1 s of physics."""
        if self._layout is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {action.shape}")
        start = self._target.copy()
        move = action - start if self.abs_action else action
        self._target = next_target(start, move)
        for k in range(1, SUBSTEPS + 1):  # the pivot slides to the target over the step
            pivot = start + (self._target - start) * (k / SUBSTEPS)
            pb.changeConstraint(
                self._grip,
                jointChildPivot=[*pivot, self._pusher_z],
                maxForce=PUSHER_MAX_FORCE,
                physicsClientId=self._client,
            )
            pb.stepSimulation(physicsClientId=self._client)
        self._follow_with_arm()
        blocks = self.block_poses()  # (2, 3), read once per step
        block_xy, last_xy = blocks[:, :2], self._block_xy
        self._block_xy = block_xy
        zones = self._block_zones(block_xy)
        reward = 0.0
        if self._first_block < 0 and max(zones) >= 0:
            self._first_block = 0 if zones[0] >= 0 else 1
            self._first_zone = zones[self._first_block]
            reward += FIRST_REWARD
        success = min(zones) >= 0 and zones[0] != zones[1]
        if success:
            reward += BOTH_REWARD
        moved = float(np.linalg.norm(block_xy - last_xy, axis=1).max())
        effector, last_effector = self.effector_xy(), self._effector
        self._effector = effector
        info = self._info(zones, moved, move=effector - last_effector)
        return self._obs(blocks), reward, success, False, info

    def render(self) -> np.ndarray:
        """An (H, W, 3) uint8 frame from above the workspace (pybullet's TinyRenderer)."""
        size = self.render_size
        view = pb.computeViewMatrix(
            cameraEyePosition=[0.42, 0.0, 1.0],  # straight above the blocks and zones
            cameraTargetPosition=[0.42, 0.0, 0.0],
            cameraUpVector=[-1.0, 0.0, 0.0],  # the robot at the top of the frame
            physicsClientId=self._client,
        )
        proj = pb.computeProjectionMatrixFOV(
            fov=45.0, aspect=1.0, nearVal=0.05, farVal=2.0, physicsClientId=self._client
        )
        _, _, rgba, _, _ = pb.getCameraImage(
            size,
            size,
            viewMatrix=view,
            projectionMatrix=proj,
            renderer=pb.ER_TINY_RENDERER,
            physicsClientId=self._client,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[..., :3].copy()

    def close(self) -> None:
        if self._client is not None and pb.isConnected(self._client):
            pb.disconnect(self._client)
        self._client = None

    # -- state -------------------------------------------------------------------------------
    @property
    def layout(self) -> dict[str, np.ndarray]:
        """The episode's initial ``{"blocks": (2, 3), "zones": (2, 3)}`` poses (x, y, yaw)."""
        if self._layout is None:
            raise RuntimeError("call reset() first")
        return {k: v.copy() for k, v in self._layout.items()}

    def block_poses(self) -> np.ndarray:
        """(2, 3) x, y, yaw of the blocks now."""
        poses = []
        for body in self._blocks:
            pos, orn = pb.getBasePositionAndOrientation(body, physicsClientId=self._client)
            yaw = pb.getEulerFromQuaternion(orn, physicsClientId=self._client)[2]
            poses.append([pos[0], pos[1], wrap_angle(yaw)])
        return np.array(poses)

    def effector_xy(self) -> np.ndarray:
        """(2,) x, y of the pusher now."""
        pos, _ = pb.getBasePositionAndOrientation(self._pusher, physicsClientId=self._client)
        return np.array(pos[:2])

    # -- internals ---------------------------------------------------------------------------
    def _build_world(self, layout: dict[str, np.ndarray]) -> None:
        """Rebuilds the scene from scratch, so an episode does not depend on the previous one."""
        c = self._client
        pb.resetSimulation(physicsClientId=c)
        pb.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=c)
        pb.setGravity(0, 0, -9.81, physicsClientId=c)
        pb.setPhysicsEngineParameter(fixedTimeStep=1.0 / PHYSICS_HZ, physicsClientId=c)
        plane = pb.loadURDF("plane.urdf", physicsClientId=c)
        pb.changeDynamics(plane, -1, lateralFriction=0.5, physicsClientId=c)
        self._arm = pb.loadURDF("xarm/xarm6_robot.urdf", useFixedBase=True, physicsClientId=c)
        self._arm_joints = [
            j
            for j in range(pb.getNumJoints(self._arm, physicsClientId=c))
            if pb.getJointInfo(self._arm, j, physicsClientId=c)[2] == pb.JOINT_REVOLUTE
        ]
        self._flange = self._arm_joints[-1]
        for link in range(-1, pb.getNumJoints(self._arm, physicsClientId=c)):
            pb.setCollisionFilterGroupMask(self._arm, link, 0, 0, physicsClientId=c)
        # The arm is posed kinematically (see _follow_with_arm): asleep, the physics skips it,
        # which halves the cost of a substep.
        pb.changeDynamics(
            self._arm, -1, activationState=pb.ACTIVATION_STATE_ENABLE_SLEEPING, physicsClientId=c
        )

        half = BLOCK_SIZE / 2
        box = pb.createCollisionShape(pb.GEOM_BOX, halfExtents=[half] * 3, physicsClientId=c)
        self._blocks = []
        for (x, y, yaw), color in zip(layout["blocks"], BLOCK_COLORS, strict=True):
            look = pb.createVisualShape(
                pb.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=color, physicsClientId=c
            )
            body = pb.createMultiBody(
                BLOCK_MASS,
                box,
                look,
                basePosition=[x, y, half],
                baseOrientation=pb.getQuaternionFromEuler([0, 0, yaw]),
                physicsClientId=c,
            )
            pb.changeDynamics(body, -1, lateralFriction=0.5, physicsClientId=c)
            self._blocks.append(body)
        for (x, y, yaw), color in zip(layout["zones"], ZONE_COLORS, strict=True):
            look = pb.createVisualShape(
                pb.GEOM_BOX,
                halfExtents=[ZONE_SIDE / 2, ZONE_SIDE / 2, 0.0005],
                rgbaColor=color,
                physicsClientId=c,
            )
            pb.createMultiBody(
                0,
                -1,
                look,
                basePosition=[x, y, 0.0005],
                baseOrientation=pb.getQuaternionFromEuler([0, 0, yaw]),
                physicsClientId=c,
            )

        self._pusher_z = EFFECTOR_HEIGHT - PUSHER_LENGTH / 2
        shape = pb.createCollisionShape(
            pb.GEOM_CYLINDER, radius=PUSHER_RADIUS, height=PUSHER_LENGTH, physicsClientId=c
        )
        look = pb.createVisualShape(
            pb.GEOM_CYLINDER,
            radius=PUSHER_RADIUS,
            length=PUSHER_LENGTH,
            rgbaColor=(0.2, 0.2, 0.2, 1.0),
            physicsClientId=c,
        )
        start = [*self._start, self._pusher_z]
        self._pusher = pb.createMultiBody(0.5, shape, look, basePosition=start, physicsClientId=c)
        pb.changeDynamics(self._pusher, -1, lateralFriction=PUSHER_FRICTION, physicsClientId=c)
        self._grip = pb.createConstraint(
            self._pusher, -1, -1, -1, pb.JOINT_FIXED, [0, 0, 0], [0, 0, 0], start,
            physicsClientId=c,
        )  # fmt: skip
        pb.changeConstraint(self._grip, maxForce=PUSHER_MAX_FORCE, physicsClientId=c)

    def _follow_with_arm(self) -> None:
        """Sets the arm's joints so its flange is above the pusher, pointing down (IK)."""
        x, y = self.effector_xy()
        joints = pb.calculateInverseKinematics(
            self._arm,
            self._flange,
            [x, y, EFFECTOR_HEIGHT],
            pb.getQuaternionFromEuler([math.pi, 0.0, 0.0]),
            maxNumIterations=20,
            physicsClientId=self._client,
        )
        for j, q in zip(self._arm_joints, joints, strict=False):
            pb.resetJointState(self._arm, j, q, physicsClientId=self._client)
        pb.changeDynamics(  # setting the joints woke it
            self._arm, -1, activationState=pb.ACTIVATION_STATE_SLEEP, physicsClientId=self._client
        )

    def _block_zones(self, block_xy: np.ndarray) -> list[int]:
        """The zone each block at ``block_xy`` (2, 2) is in (its closest zone, within
        ``ZONE_RADIUS``), -1 if none."""
        zones = self._layout["zones"][:, :2]  # (2, 2)
        out = []
        for xy in block_xy:  # (2,) per block
            dist = np.linalg.norm(zones - xy, axis=1)  # (2,)
            nearest = int(np.argmin(dist))
            out.append(nearest if dist[nearest] < ZONE_RADIUS else -1)
        return out

    def _obs(self, blocks: np.ndarray) -> np.ndarray:
        """The 16-value observation, with the blocks' (2, 3) poses and the effector already
        read."""
        zones = self._layout["zones"]  # (2, 3)
        obs = np.concatenate([blocks[0], blocks[1], self._effector, self._target, *zones])
        return obs.astype(np.float32)  # (16,)

    def _info(self, zones: list[int], moved: float, move: np.ndarray) -> dict[str, Any]:
        return {
            "block0_zone": int(zones[0]),
            "block1_zone": int(zones[1]),
            "first_block": int(self._first_block),
            "first_zone": int(self._first_zone),
            "is_success": bool(min(zones) >= 0 and zones[0] != zones[1]),
            "block_moved": moved,
            "effector_move": move,  # (2,) the pusher's x, y travel over the step
        }


def make_blockpush_env(
    render_size: int = 96,
    max_episode_steps: int | None = None,
    abs_action: bool = False,
    layout: str = "paper",
) -> gym.Env:
    """Builds a :class:`BlockPushEnv`; picklable arguments, so usable as a vector-env factory.

    Args:
        render_size: Side in pixels of :meth:`BlockPushEnv.render` frames.
        max_episode_steps: Truncate episodes after this many steps (TimeLimit) if given.
        abs_action: Actions are next targets (x, y) rather than moves.
        layout: "paper" or "wide" initial poses.
    """
    env: gym.Env = BlockPushEnv(render_size=render_size, abs_action=abs_action, layout=layout)
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps)
    return env
