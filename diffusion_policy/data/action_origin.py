"""Relative actions: an action chunk as offsets from the current frame's observed values.

A policy with ``action_origin = {obs_key: [i_0, ..., i_{Da-1}]}`` predicts each action of a
chunk minus the values of the current (last observed) frame of ``obs_key`` at those flat
indices, and adds them back when it samples. BlockPush's ``{obs: [8, 9]}`` predicts effector
targets as offsets from the commanded target now: the chunk no longer has to carry the
absolute position, only the geometry around the effector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffusion_policy.data.keys import LOW_DIM


def parse_action_origin(
    action_origin: Mapping[str, Sequence[int]] | None, shape_meta: Mapping[str, Any]
) -> tuple[str, list[int]] | None:
    """Checks ``action_origin`` against a dataset's shape description.

    Args:
        action_origin: ``{obs_key: indices}``, one low-dim key and one index (into the key's
            flattened frame) per action dimension; None or empty for absolute actions.
        shape_meta: The dataset's shape description.

    Returns:
        ``(obs_key, indices)``, or None.

    Raises:
        ValueError: More than one key, a key that is not a low-dim observation, or indices
            that do not give one in-range value per action dimension.
    """
    if not action_origin:
        return None
    if len(action_origin) != 1:
        raise ValueError(f"action_origin={dict(action_origin)} must name one observation key")
    ((key, dims),) = action_origin.items()
    meta = shape_meta["obs"].get(key)
    if meta is None or meta.get("type", LOW_DIM) != LOW_DIM:
        raise ValueError(
            f"action_origin key {key!r} is not a low-dim observation key of "
            f"{sorted(shape_meta['obs'])}"
        )
    size = int(np.prod(meta["shape"]))
    action_dim = int(shape_meta["action"]["shape"][0])
    dims = [int(i) for i in dims]
    if len(dims) != action_dim or not all(0 <= i < size for i in dims):
        raise ValueError(
            f"action_origin {key!r}: {dims} must give one index in [0, {size}) per action "
            f"dimension ({action_dim})"
        )
    return key, dims


def relative_window_actions(
    obs: np.ndarray, action: np.ndarray, windows: np.ndarray, n_obs_steps: int, dims: list[int]
) -> np.ndarray:
    """Every window's actions minus its current frame's origin, flattened to steps.

    Args:
        obs: The origin key's per-step values (n_steps, ...).
        action: Per-step actions (n_steps, Da).
        windows: Global step indices of each window (N, T).
        n_obs_steps: Observed frames To; the current frame is the window's step To - 1.
        dims: Flat indices of the origin in an observation frame, one per action dimension.

    Returns:
        (N * T, Da) relative actions, what a policy with this origin normalizes.
    """
    origin = obs[windows[:, n_obs_steps - 1]].reshape(len(windows), -1)[:, dims]  # (N, Da)
    relative = action[windows] - origin[:, None]  # (N, T, Da)
    return relative.reshape(-1, action.shape[-1])
