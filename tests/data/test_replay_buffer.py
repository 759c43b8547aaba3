"""ReplayBuffer: building, access, zarr save/reopen (atomic overwrite) and load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from diffusion_policy.data.errors import DatasetError, DatasetNotFoundError
from diffusion_policy.data.replay_buffer import ReplayBuffer


def write_store(path: Path, arrays: dict[str, np.ndarray], ends: np.ndarray | None, fmt=2):
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    for key, arr in arrays.items():
        root.create_array(f"data/{key}", data=arr)
    if ends is not None:
        root.create_array("meta/episode_ends", data=np.asarray(ends, dtype=np.int64))
    return path


def assert_same(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert sorted(a.keys()) == sorted(b.keys())  # a reopened store lists keys sorted
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    for k in a.keys():  # noqa: SIM118 (a ReplayBuffer is not a dict)
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


def test_add_episode_and_access(make_replay_buffer):
    rb = make_replay_buffer((5, 7))
    assert (rb.n_episodes, rb.n_steps) == (2, 12)
    np.testing.assert_array_equal(rb.episode_ends, [5, 12])
    np.testing.assert_array_equal(rb.episode_lengths, [5, 7])
    assert rb.keys() == ["state", "keypoint", "action"]
    assert rb["keypoint"].shape == (12, 9, 2)
    assert rb.episode_slice(-1) == slice(5, 12)
    ep = rb.get_episode(1)
    np.testing.assert_array_equal(ep["action"][:, 0], np.arange(5, 12))
    np.testing.assert_array_equal(rb.get_episode(-2)["state"][:, 4], np.arange(5))
    with pytest.raises(IndexError, match="episode index 2 out of range for 2 episodes"):
        rb.get_episode(2)
    with pytest.raises(KeyError, match="'img'"):
        rb["img"]
    # Appending after a read keeps earlier data and extends the arrays.
    rb.add_episode({k: v[:3] for k, v in rb.get_episode(0).items()})
    assert rb.n_steps == 15 and rb["action"].shape == (15, 2)


def test_add_episode_errors(make_replay_buffer):
    rb = make_replay_buffer((3,))
    good = rb.get_episode(0)
    with pytest.raises(DatasetError, match=r"differ from the buffer's keys"):
        rb.add_episode({"state": good["state"]})
    with pytest.raises(DatasetError, match="share one length"):
        rb.add_episode({**good, "action": good["action"][:2]})
    with pytest.raises(DatasetError, match=r"'state' has per-step shape \(4,\)"):
        rb.add_episode({**good, "state": np.zeros((3, 4))})
    assert rb.n_episodes == 1  # Nothing was half-added.


def test_save_reopen_round_trip(tmp_path, make_replay_buffer):
    rb = make_replay_buffer((5, 7))
    path = rb.save(tmp_path / "buf.zarr")
    assert zarr.open_group(str(path), mode="r").metadata.zarr_format == 2
    assert_same(rb, ReplayBuffer.open(path))
    sub = ReplayBuffer.open(path, keys=["action"])
    assert sub.keys() == ["action"] and sub.n_episodes == 2


def test_save_overwrites_atomically(tmp_path, make_replay_buffer, monkeypatch):
    path = tmp_path / "buf.zarr"
    make_replay_buffer((5, 7)).save(path)
    new = make_replay_buffer((3, 4, 6))
    new.save(path)
    assert_same(new, ReplayBuffer.open(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buf.zarr"]  # no temp leftovers

    def crash(self, p):
        (Path(p) / "partial").write_text("x")  # the temporary folder exists already
        raise RuntimeError("disk full")

    monkeypatch.setattr(ReplayBuffer, "_write", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        make_replay_buffer((2,)).save(path)
    assert_same(new, ReplayBuffer.open(path))  # the old store is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buf.zarr"]


def test_open_zarr_v3_and_lossless_dtype(tmp_path):
    img = np.arange(4 * 2 * 2 * 3, dtype=np.float32).reshape(4, 2, 2, 3) % 256
    path = write_store(tmp_path / "v3.zarr", {"img": img}, [1, 4], fmt=3)
    rb = ReplayBuffer.open(path, dtypes={"img": np.uint8})
    assert rb["img"].dtype == np.uint8
    np.testing.assert_array_equal(rb["img"], img.astype(np.uint8))
    lossy = write_store(tmp_path / "lossy.zarr", {"img": img + 0.5}, [1, 4])
    with pytest.raises(DatasetError, match="data/img from float32 to uint8 loses information"):
        ReplayBuffer.open(lossy, dtypes={"img": np.uint8})


def test_open_errors(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(DatasetNotFoundError, match=f"no zarr store at {missing}") as e:
        ReplayBuffer.open(missing)
    assert isinstance(e.value, FileNotFoundError)

    a = np.zeros((6, 2), np.float32)
    no_ends = write_store(tmp_path / "no_ends.zarr", {"action": a}, None)
    with pytest.raises(DatasetError, match="has no meta/episode_ends"):
        ReplayBuffer.open(no_ends)

    short = write_store(tmp_path / "short.zarr", {"action": a}, [2, 8])
    with pytest.raises(DatasetError, match="data/action has 6 steps but meta/episode_ends.* 8"):
        ReplayBuffer.open(short)

    ok = write_store(tmp_path / "ok.zarr", {"action": a, "state": a}, [2, 6])
    with pytest.raises(DatasetError, match=r"no data/img; available keys: \['action', 'state'\]"):
        ReplayBuffer.open(ok, keys=["img"])

    unsorted = write_store(tmp_path / "unsorted.zarr", {"action": a}, [4, 4, 6])
    with pytest.raises(DatasetError, match=r"strictly increasing.*episode_ends\[1\]=4 after 4"):
        ReplayBuffer.open(unsorted)
