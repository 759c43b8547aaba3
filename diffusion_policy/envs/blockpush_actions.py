"""BlockPush's action geometry: how an action moves the effector target (no simulator needed).

The paper's action is a relative move of the effector target, (dx, dy) metres, each within
``MAX_MOVE``, the target staying in the workspace. The same demonstrations can be replayed with
absolute actions, the next target itself (x, y): :func:`absolute_actions` turns recorded moves
into the targets they led to, and the env with ``abs_action`` turns a target back into the move.
"""

from __future__ import annotations

import numpy as np

# Workspace of the effector (target), metres in the robot base frame.
WORKSPACE_X = (0.15, 0.7)
WORKSPACE_Y = (-0.5, 0.5)
MAX_MOVE = 0.1  # metres per step in x and in y
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
