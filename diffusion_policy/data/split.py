"""Train/validation split by whole episodes."""

from __future__ import annotations

import numpy as np


def split_episodes(
    n_episodes: int,
    val_ratio: float,
    seed: int,
    max_train_episodes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits episodes into disjoint train and validation sets.

    Args:
        n_episodes: Number of episodes.
        val_ratio: Fraction of episodes held out, in [0, 1). When it is > 0 and there are at
            least two episodes, at least one episode is held out and at least one kept.
        seed: Seed of the random draw (the same seed gives the same split).
        max_train_episodes: If set, keep only this many randomly chosen train episodes (the
            paper trains Push-T on 90); the others are in neither set.

    Returns:
        ``(train_mask, val_mask)``, each ``(n_episodes,)`` bool.
    """
    if n_episodes < 0:
        raise ValueError(f"n_episodes={n_episodes} must be >= 0")
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio={val_ratio} must be in [0, 1)")
    if max_train_episodes is not None and max_train_episodes < 1:
        raise ValueError(f"max_train_episodes={max_train_episodes} must be >= 1 or None")
    rng = np.random.default_rng(seed)
    n_val = round(n_episodes * val_ratio)
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(n_val, 1), n_episodes - 1)
    order = rng.permutation(n_episodes)
    val_mask = np.zeros(n_episodes, dtype=bool)
    val_mask[order[:n_val]] = True
    train = order[n_val:]
    if max_train_episodes is not None and len(train) > max_train_episodes:
        train = rng.choice(train, size=max_train_episodes, replace=False)
    train_mask = np.zeros(n_episodes, dtype=bool)
    train_mask[train] = True
    return train_mask, val_mask
