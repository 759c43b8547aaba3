"""split_episodes: whole episodes, disjoint sets, at least one val episode, train cap."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_policy.data.split import split_episodes


def test_split_is_disjoint_and_seeded():
    train, val = split_episodes(206, 0.02, seed=42)
    assert not (train & val).any() and (train | val).all()
    assert val.sum() == 4
    again, _ = split_episodes(206, 0.02, seed=42)
    other, _ = split_episodes(206, 0.02, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_split_edge_cases():
    _, val = split_episodes(10, 0.01, seed=0)
    assert val.sum() == 1  # at least one val episode when val_ratio > 0
    train, val = split_episodes(2, 0.9, seed=0)
    assert train.sum() == 1 and val.sum() == 1  # and at least one train episode
    train, val = split_episodes(5, 0.0, seed=0)
    assert train.all() and not val.any()
    with pytest.raises(ValueError, match="val_ratio=1.5"):
        split_episodes(5, 1.5, seed=0)


def test_max_train_episodes_subsamples_train_only():
    train, val = split_episodes(206, 0.02, seed=42, max_train_episodes=90)
    _, val_all = split_episodes(206, 0.02, seed=42)
    assert train.sum() == 90 and not (train & val).any()
    assert np.array_equal(val, val_all)
