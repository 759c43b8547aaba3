"""Shared fixtures: the real Push-T store (skipped when absent) and small hand-made buffers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

import diffusion_policy.training  # noqa: F401 -- registers trainer/schema before any compose

# One convolution path for every test process (subprocesses inherit it): runs compared bit for
# bit must not pick different kernels by timing. tests/denoisers tests the automatic choice.
os.environ.setdefault("DP_CONV_PATH", "gemm")
from diffusion_policy.data.replay_buffer import ReplayBuffer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PUSHT = REPO_ROOT.parent / "shared" / "data" / "pusht" / "pusht_cchi_v7_replay.zarr"

# Per-step shapes of the Push-T low-dim keys.
PUSHT_SHAPES = {"state": (5,), "keypoint": (9, 2), "action": (2,)}


@pytest.fixture(scope="session")
def pusht_zarr_path() -> Path:
    """The real Push-T store: ``$PUSHT_ZARR`` if set, else ``<repo>/../shared/data/pusht/...``."""
    env = os.environ.get("PUSHT_ZARR")
    path = Path(env) if env else SHARED_PUSHT
    if not path.exists():
        pytest.skip(f"real Push-T data not found at {path}; set PUSHT_ZARR to a local copy")
    return path


@pytest.fixture
def make_replay_buffer() -> Callable[..., ReplayBuffer]:
    """Factory of small Push-T-shaped buffers whose every value is its global step index.

    ``make(lengths=(5, 7), shapes=PUSHT_SHAPES)`` -> a buffer with one episode per length and
    float32 arrays ``{key: (n_steps, *shape)}``, ``array[t, ...] == t``.
    """

    def make(
        lengths: Sequence[int] = (5, 7), shapes: dict[str, tuple[int, ...]] | None = None
    ) -> ReplayBuffer:
        buffer = ReplayBuffer.create_empty()
        start = 0
        for n in lengths:
            t = np.arange(start, start + n, dtype=np.float32)
            buffer.add_episode(
                {
                    k: np.broadcast_to(t.reshape(-1, *[1] * len(s)), (n, *s))
                    for k, s in (shapes or PUSHT_SHAPES).items()
                }
            )
            start += n
        return buffer

    return make


@pytest.fixture
def tiny_pusht_zarr(tmp_path: Path, make_replay_buffer: Callable[..., ReplayBuffer]) -> Path:
    """A saved Push-T-shaped store (episodes of 20, 25, 30, 35 steps) in ``tmp_path``."""
    return make_replay_buffer((20, 25, 30, 35)).save(tmp_path / "tiny_pusht.zarr")


@pytest.fixture(scope="session")
def tiny_pusht_all_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with every Push-T key, images included, for the keypoint and image datasets."""
    buffer = ReplayBuffer.create_empty()
    start = 0
    for n in (20, 25, 30, 35):
        t = np.arange(start, start + n, dtype=np.float32)
        shapes = {**PUSHT_SHAPES, "img": (96, 96, 3)}
        buffer.add_episode(
            {k: np.broadcast_to(t.reshape(-1, *[1] * len(s)), (n, *s)) for k, s in shapes.items()}
        )
        start += n
    return buffer.save(tmp_path_factory.mktemp("store") / "tiny_pusht_all.zarr")
