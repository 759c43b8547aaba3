"""BlockPush's action geometry: how an action moves the effector target (no simulator needed).

The paper's action is a relative move of the effector target, (dx, dy) metres, each within
``MAX_MOVE``, the target staying in the workspace. The same demonstrations can be replayed with
absolute actions, the next target itself (x, y): :func:`absolute_actions` turns recorded moves
into the targets they led to, and the env with ``abs_action`` turns a target back into the move.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Workspace of the effector (target), metres in the robot base frame.
WORKSPACE_X = (0.15, 0.7)
WORKSPACE_Y = (-0.5, 0.5)
MAX_MOVE = 0.1  # metres per step in x and in y
EFFECTOR_XY = (6, 7)  # the effector's x, y in the 16-value observation
TARGET_XY = (8, 9)  # the commanded target's x, y in the 16-value observation


def next_target(target: np.ndarray, move: np.ndarray) -> np.ndarray:
    """The target after a move: ``target + move``, the move clipped to ``MAX_MOVE`` per axis and
    the result to the workspace.

    Args:
        target: Current targets (..., 2).
        move: Moves (..., 2).

    Returns:
        The next targets (..., 2).
    """
    low, high = (WORKSPACE_X[0], WORKSPACE_Y[0]), (WORKSPACE_X[1], WORKSPACE_Y[1])
    return np.clip(target + np.clip(move, -MAX_MOVE, MAX_MOVE), low, high)


def absolute_actions(obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Recorded relative actions as the absolute targets they set.

    Args:
        obs: Observations before each action (N, 16).
        action: Relative actions (N, 2).

    Returns:
        (N, 2) float32 next targets; replayed in an env with ``abs_action``, they make the same
        moves.
    """
    target = obs[:, list(TARGET_XY)].astype(np.float64)
    return next_target(target, action.astype(np.float64)).astype(np.float32)


# Planar positions and yaws in the 16-value observation (blocks, effector, target, zones).
OBS_XY = ((0, 1), (3, 4), (6, 7), (8, 9), (10, 11), (13, 14))
OBS_YAW = (2, 5, 12, 15)
WORKSPACE_CENTER = (0.425, 0.0)


def move_scene(
    obs: torch.Tensor, targets: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scenes rotated about the workspace centre and shifted in the table plane.

    Pushing is the same physics in any rotated or shifted copy of a layout, so a window moved
    this way is another valid demonstration window (workspace limits aside).

    Args:
        obs: Observations (B, To, 16).
        targets: Absolute effector targets (B, T, 2).
        angle: Rotation per window (B,), radians.
        shift: Translation per window (B, 2), metres, applied after the rotation.

    Returns:
        The moved ``(obs, targets)``; yaws stay wrapped to [-pi, pi).
    """
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (B, 1)
    cx, cy = WORKSPACE_CENTER

    def rotate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dx, dy = x - cx, y - cy  # (B, steps)
        return cx + cos * dx - sin * dy + shift[:, :1], cy + sin * dx + cos * dy + shift[:, 1:]

    obs, targets = obs.clone(), targets.clone()
    for ix, iy in OBS_XY:
        obs[..., ix], obs[..., iy] = rotate(obs[..., ix], obs[..., iy])
    for i in OBS_YAW:
        obs[..., i] = torch.remainder(obs[..., i] + angle[:, None] + math.pi, 2 * math.pi) - math.pi
    targets[..., 0], targets[..., 1] = rotate(targets[..., 0], targets[..., 1])
    return obs, targets


# The pusher's own values in the observation: the effector's x, y and its commanded target's.
OWN_XY = (*EFFECTOR_XY, *TARGET_XY)


def scale_own_motion(obs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Windows whose older frames show the pusher's own motion scaled.

    Each older frame's effector and commanded target are put at ``current - scale * (current -
    older)``: scale 0 shows a pusher at rest, 1 the window as recorded, 2 a pusher twice as fast.
    The blocks, the zones and the current frame are unchanged.

    Args:
        obs: Observations (B, To, 16), the last frame being the current one.
        scale: Scale per window (B,).

    Returns:
        The changed observations (B, To, 16).
    """
    own = list(OWN_XY)
    obs = obs.clone()
    current = obs[:, -1:, own]  # (B, 1, 4)
    obs[:, :-1, own] = current - scale[:, None, None] * (current - obs[:, :-1, own])
    return obs
