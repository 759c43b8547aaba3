"""Property tests of the dataset loader: a randomly damaged store is a DatasetError naming the
damage (key and index, episode or chunk), never a hang and never a silently loaded dataset."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.data.pusht_dataset import PushTKeypointDataset
from diffusion_policy.data.replay_buffer import ReplayBuffer

KEYS = ("state", "keypoint", "action")
SHAPES = {"state": (5,), "keypoint": (9, 2), "action": (2,)}
CHUNK_ROWS = 16


def _write(path: Path, arrays: dict, ends) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        root.create_array(
            f"data/{key}",
            data=arr,
            chunks=(CHUNK_ROWS, *arr.shape[1:]) if arr.ndim else (),
            config={"write_empty_chunks": True},
        )
    if ends is not None:
        root.create_array("meta/episode_ends", data=np.asarray(ends))


@st.composite
def damaged_store(draw):
    """(arrays, episode_ends, chunk to corrupt or None, regex the error must match)."""
    lengths = draw(st.lists(st.integers(10, 30), min_size=2, max_size=5))
    ends = np.cumsum(lengths)
    n = int(ends[-1])
    arrays = {k: np.full((n, *s), 100.0, np.float32) for k, s in SHAPES.items()}
    key = draw(st.sampled_from(KEYS))
    kind = draw(
        st.sampled_from(
            ["nonfinite", "drop", "length", "ends_order", "ends_dtype", "ends_over", "dtype"]
            + ["shape", "corrupt"]
        )
    )
    corrupt = None
    if kind == "nonfinite":
        step = draw(st.integers(0, n - 1))
        rest = tuple(draw(st.integers(0, d - 1)) for d in SHAPES[key])
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[key][(step, *rest)] = value
        episode = int(np.searchsorted(ends, step, side="right"))
        index = ", ".join(map(str, (step, *rest)))
        expect = rf"data/{key}\[{index}\] is {value} \(step {step}, episode {episode}\)"
    elif kind == "drop":
        del arrays[key]
        expect = rf"has no data/{key}; available keys"
    elif kind == "length":
        m = draw(st.integers(0, 2 * n).filter(lambda m: m != n))
        arrays[key] = np.zeros((m, *SHAPES[key]), np.float32)
        expect = rf"data/{key} has {m} steps but meta/episode_ends\[-1\] is {n}"
    elif kind == "ends_order":
        i = draw(st.integers(1, len(ends) - 1))
        ends[i] = draw(st.integers(-5, int(ends[i - 1])))
        expect = r"strictly increasing from > 0; episode_ends\[\d+\]="
    elif kind == "ends_dtype":
        ends = ends.astype(draw(st.sampled_from([np.float32, np.float64, np.complex64])))
        expect = r"episode_ends must be a 1-D integer array"
    elif kind == "ends_over":
        ends[-1] += draw(st.integers(1, 100))
        expect = rf"has {n} steps but meta/episode_ends\[-1\] is {int(ends[-1])}"
    elif kind == "dtype":
        arrays[key] = arrays[key].astype(draw(st.sampled_from([np.complex64, "U3"])))
        expect = rf"data/{key} has shape .* expected a numeric"
    elif kind == "shape":
        shape = draw(st.lists(st.integers(1, 10), max_size=3).map(tuple))
        shape = shape if shape != SHAPES[key] else (*shape, 1)
        arrays[key] = np.zeros((n, *shape), np.float32)
        want = re.escape(str(SHAPES[key]))
        expect = rf"data/{key} has per-step shape {re.escape(str(shape))}, expected {want}"
    else:  # corrupt
        i = draw(st.integers(0, (n - 1) // CHUNK_ROWS))
        corrupt = (key, i)
        steps = rf"steps {i * CHUNK_ROWS}\.\.{min((i + 1) * CHUNK_ROWS, n) - 1}"
        expect = rf"data/{key}: chunk '{i}(\.0)+' \({steps}\) is corrupt"
    return arrays, ends, corrupt, expect


@settings(
    max_examples=40,
    deadline=None,  # timings vary with machine load; a hang would still fail the run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=damaged_store(), garbage=st.binary(min_size=0, max_size=64))
def test_damaged_store_is_a_dataset_error_naming_the_damage(case, garbage):
    arrays, ends, corrupt, expect = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.zarr"
        _write(path, arrays, ends)
        if corrupt is not None:
            key, i = corrupt
            chunk = path / "data" / key / ".".join([str(i)] + ["0"] * len(SHAPES[key]))
            chunk.write_bytes(b"\x02\x01" + garbage)  # a Blosc header, then garbage
        try:
            PushTKeypointDataset(str(path), horizon=8, val_ratio=0.0)
        except DatasetError as e:
            assert re.search(expect, str(e)), (expect, str(e))
            assert str(path) in str(e)
        else:
            raise AssertionError(f"loaded a damaged store without error; expected {expect!r}")


@settings(max_examples=15, deadline=None, database=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    fmt=st.sampled_from([2, 3]),
)
def test_sound_store_round_trips(lengths, fmt):
    """The validation refuses no sound store: random episode layouts load back unchanged."""
    ends = np.cumsum(lengths)
    rng = np.random.default_rng(len(lengths))
    arrays = {k: rng.normal(size=(int(ends[-1]), *s)).astype(np.float32) for k, s in SHAPES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = ReplayBuffer(arrays, ends).save(Path(tmp) / "store.zarr")
        loaded = ReplayBuffer.open(path, shapes=SHAPES)
        np.testing.assert_array_equal(loaded.episode_ends, ends)
        for k, v in arrays.items():
            np.testing.assert_array_equal(loaded[k], v)
