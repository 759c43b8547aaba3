"""Opening a malformed store fails with a DatasetError naming the key and the index or chunk."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import zarr

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.data.pusht_dataset import PushTKeypointDataset
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.data.sequence_dataset import Field, SequenceDataset, flatten_steps

REPO = Path(__file__).resolve().parents[2]


def pusht_arrays(n: int = 60) -> dict[str, np.ndarray]:
    t = np.arange(n, dtype=np.float32)
    return {
        "state": np.repeat(t[:, None], 5, axis=1),  # (n, 5)
        "keypoint": np.repeat(t[:, None, None], 9, axis=1).repeat(2, axis=2),  # (n, 9, 2)
        "action": np.repeat(t[:, None], 2, axis=1),  # (n, 2)
    }


def write_store(path: Path, arrays: dict, ends, chunk_rows: int = 20, fmt: int = 2) -> Path:
    """A store as other tools write it (compressed, ``chunk_rows`` steps per chunk)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        chunks = (min(chunk_rows, max(1, len(arr))), *arr.shape[1:]) if arr.ndim else ()
        root.create_array(f"data/{key}", data=arr, chunks=chunks)
    if ends is not None:
        root.create_array("meta/episode_ends", data=np.asarray(ends))
    return path


ENDS = [20, 45, 60]


@pytest.mark.parametrize(
    ("key", "index", "value", "message"),
    [
        ("action", (7, 1), np.nan, r"data/action\[7, 1\] is nan \(step 7, episode 0\)"),
        ("state", (50, 0), np.inf, r"data/state\[50, 0\] is inf \(step 50, episode 2\)"),
        (
            "keypoint",
            (21, 8, 1),
            -np.inf,
            r"data/keypoint\[21, 8, 1\] is -inf \(step 21, episode 1\)",
        ),
    ],
)
def test_nan_and_inf_are_named_with_their_index(tmp_path, key, index, value, message):
    arrays = pusht_arrays()
    arrays[key][index] = value
    path = write_store(tmp_path / "bad.zarr", arrays, ENDS)
    with pytest.raises(DatasetError, match=message) as err:
        PushTKeypointDataset(str(path), horizon=8)
    assert str(path) in str(err.value)
    np.testing.assert_equal(ReplayBuffer.open(path, check_finite=False)[key][index], value)


def test_corrupt_chunk_is_named(tmp_path):
    path = write_store(tmp_path / "bad.zarr", pusht_arrays(), ENDS)
    (path / "data" / "action" / "1.0").write_bytes(b"\x02\x01garbage, not blosc")
    with pytest.raises(DatasetError) as err:
        PushTKeypointDataset(str(path), horizon=8)
    assert re.search(r"data/action: chunk '1.0' \(steps 20..39\) is corrupt", str(err.value))


def test_corrupt_chunk_is_named_in_zarr_v3(tmp_path):
    path = write_store(tmp_path / "bad.zarr", pusht_arrays(), ENDS, fmt=3)
    (path / "data" / "state" / "c" / "2" / "0").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"data/state: chunk 'c/2/0' \(steps 40..59\)"):
        ReplayBuffer.open(path)


def test_missing_chunk_warns(tmp_path, caplog):
    path = ReplayBuffer(pusht_arrays(), np.array(ENDS)).save(tmp_path / "ok.zarr")
    (path / "data" / "state" / "0.0").unlink()  # a partial copy
    with caplog.at_level(logging.WARNING):
        ReplayBuffer.open(path)
    assert "data/state: 1 of 1 chunks are not stored" in caplog.text


@pytest.mark.parametrize(
    ("ends", "message"),
    [
        ([20, 20, 60], r"strictly increasing .*episode_ends\[1\]=20 after 20"),
        ([45, 20, 60], r"episode_ends\[1\]=20 after 45"),
        ([0, 60], r"episode_ends\[0\]=0 after 0"),
        (np.array([20.0, 45.0, 60.0]), r"1-D integer array; got shape \(3,\), dtype float64"),
        (np.array([[20, 45, 60]]), r"1-D integer array; got shape \(1, 3\)"),
        ([20, 45, 61], r"data/\w+ has 60 steps but meta/episode_ends\[-1\] is 61"),
    ],
)
def test_bad_episode_ends(tmp_path, ends, message):
    path = write_store(tmp_path / "bad.zarr", pusht_arrays(), ends)
    with pytest.raises(DatasetError, match=message):
        PushTKeypointDataset(str(path), horizon=8)


def test_missing_key_and_bad_layout(tmp_path):
    arrays = pusht_arrays()
    del arrays["keypoint"]
    path = write_store(tmp_path / "nokp.zarr", arrays, ENDS)
    with pytest.raises(DatasetError, match=r"has no data/keypoint; available keys"):
        PushTKeypointDataset(str(path), horizon=8)

    flat = tmp_path / "flat.zarr"
    root = zarr.open_group(str(flat), mode="w", zarr_format=2)
    root.create_array("data", data=np.zeros(60))
    root.create_array("meta/episode_ends", data=np.array(ENDS))
    with pytest.raises(DatasetError, match="data is not a group of arrays"):
        ReplayBuffer.open(flat)

    nested = write_store(tmp_path / "nested.zarr", pusht_arrays(), None)
    zarr.open_group(str(nested), mode="a").create_group("meta/episode_ends")
    with pytest.raises(DatasetError, match="has no meta/episode_ends array"):
        ReplayBuffer.open(nested)

    broken = write_store(tmp_path / "broken.zarr", pusht_arrays(), ENDS)
    (broken / "data" / "action" / ".zarray").write_text("{not json")
    with pytest.raises(DatasetError, match=r"data/action cannot be opened \(Expecting property"):
        ReplayBuffer.open(broken)

    not_zarr = tmp_path / "not_zarr"
    not_zarr.mkdir()
    (not_zarr / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="not_zarr"):
        ReplayBuffer.open(not_zarr)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array(["a"] * 60), r"data/action has shape \(60,\) and dtype <U1; expected a numeric"),
        (np.zeros((60, 2), np.complex64), "dtype complex64; expected a numeric"),
        (np.float32(3.0), r"data/action has shape \(\) and dtype float32"),
    ],
)
def test_non_numeric_arrays(tmp_path, array, message):
    arrays = {**pusht_arrays(), "action": array}
    path = write_store(tmp_path / "bad.zarr", arrays, ENDS)
    with pytest.raises(DatasetError, match=message):
        ReplayBuffer.open(path)


class _ShapedDataset(SequenceDataset):
    """Declares the per-step shapes it expects, as a dataset class does."""

    obs_fields: ClassVar[dict[str, Field]] = {"keypoint": Field("keypoint", flatten_steps)}
    action_field: ClassVar[Field] = Field("action")
    zarr_shapes: ClassVar[dict[str, tuple[int | None, ...]]] = {
        "keypoint": (9, 2),
        "action": (None,),
    }


def test_pusht_store_of_another_layout(tmp_path):
    arrays = {**pusht_arrays(), "keypoint": np.zeros((60, 18), np.float32)}
    path = write_store(tmp_path / "flat_kp.zarr", arrays, ENDS)
    with pytest.raises(
        DatasetError, match=r"data/keypoint has per-step shape \(18,\), expected \(9, 2\)"
    ):
        PushTKeypointDataset(str(path), horizon=8)


def test_shapes_that_disagree_with_the_dataset(tmp_path):
    arrays = {**pusht_arrays(), "keypoint": np.zeros((60, 8, 2), np.float32)}
    path = write_store(tmp_path / "kp8.zarr", arrays, ENDS)
    with pytest.raises(
        DatasetError, match=r"data/keypoint has per-step shape \(8, 2\), expected \(9, 2\)"
    ):
        _ShapedDataset(str(path), horizon=8)
    arrays = {**pusht_arrays(), "action": np.zeros((60, 2, 1), np.float32)}
    path = write_store(tmp_path / "act3d.zarr", arrays, ENDS)
    with pytest.raises(
        DatasetError, match=r"data/action has per-step shape \(2, 1\), expected \('any',\)"
    ):
        _ShapedDataset(str(path), horizon=8)
    ok = write_store(tmp_path / "ok.zarr", pusht_arrays(), ENDS)
    assert len(_ShapedDataset(str(ok), horizon=8)) > 0


_KILLED_SAVE = """
import sys, time
import numpy as np
from diffusion_policy.data.replay_buffer import ReplayBuffer

real_write = ReplayBuffer._write

def slow_write(self, path):
    real_write(self, path)
    print("written", flush=True)
    time.sleep(60)  # killed here: the new store is complete but not yet renamed into place

ReplayBuffer._write = slow_write
ReplayBuffer({"action": np.ones((30, 2), np.float32)}, np.array([30])).save(sys.argv[1])
"""


def test_kill_during_dataset_save_keeps_the_previous_store(tmp_path):
    path = ReplayBuffer(pusht_arrays(), np.array(ENDS)).save(tmp_path / "demos.zarr")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    rb = ReplayBuffer.open(path)
    np.testing.assert_array_equal(rb.episode_ends, ENDS)
    np.testing.assert_array_equal(rb["action"], pusht_arrays()["action"])
    assert [p.name.startswith(".demos.zarr.tmp-") for p in tmp_path.iterdir()].count(True) == 1
