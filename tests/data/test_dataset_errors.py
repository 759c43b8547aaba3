"""Datasets that cannot give a training window fail with a short error saying why."""

from __future__ import annotations

import logging
import traceback

import numpy as np
import pytest

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.data.pusht_dataset import PushTKeypointDataset
from tests.data.test_validation import pusht_arrays, write_store


def test_empty_store_is_an_error(tmp_path):
    # Before: a dataset of 0 windows, reported later as "0 training windows" by the trainer.
    arrays = {k: v[:0] for k, v in pusht_arrays().items()}
    path = write_store(tmp_path / "empty.zarr", arrays, np.zeros(0, np.int64))
    with pytest.raises(DatasetError, match=r"empty.zarr has no episodes \(meta/episode_ends is"):
        PushTKeypointDataset(str(path), horizon=8)


def test_episodes_shorter_than_a_window_name_lengths_and_horizon(tmp_path):
    path = write_store(tmp_path / "short.zarr", pusht_arrays(9), [3, 5, 9])
    with pytest.raises(DatasetError) as err:
        PushTKeypointDataset(str(path), horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=0)
    msg = str(err.value)
    assert "no training windows: all 3 train episodes are too short" in msg
    assert "episode lengths [3, 2, 4]" in msg
    assert "a window needs 8 steps of an episode (horizon=16" in msg
    assert "shorter episodes are dropped, not padded further" in msg


def test_some_short_episodes_are_dropped_with_a_warning(tmp_path, caplog):
    path = write_store(tmp_path / "mixed.zarr", pusht_arrays(30), [3, 30])
    with caplog.at_level(logging.WARNING):
        ds = PushTKeypointDataset(str(path), horizon=16, val_ratio=0)
    assert len(ds) == 27 - 8 + 1  # only the 27-step episode gives windows
    assert "1 of 2 train episodes are dropped, lengths [3]" in caplog.text


def test_corrupt_chunk_error_is_short(tmp_path):
    # Before: the DatasetError was chained to zarr's, under ~300 lines of asyncio frames.
    path = write_store(tmp_path / "bad.zarr", pusht_arrays(), [20, 45, 60])
    (path / "data" / "action" / "1.0").write_bytes(b"\x02\x01garbage, not blosc")
    with pytest.raises(DatasetError, match=r"data/action: chunk '1.0' \(steps 20..39\)") as err:
        PushTKeypointDataset(str(path), horizon=8)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    report = "".join(traceback.format_exception(err.value))
    assert len(report.splitlines()) < 40, report
