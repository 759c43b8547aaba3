"""Fixtures for the env tests: the real Push-T arrays (low-dim only), or a skip."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ZARR = REPO_ROOT.parent / "shared" / "data" / "pusht" / "pusht_cchi_v7_replay.zarr"


@pytest.fixture(scope="session")
def pusht_lowdim_arrays() -> dict[str, np.ndarray]:
    """``state``, ``keypoint``, ``action`` and ``episode_ends`` of the real store (not ``img``).

    Resolved from ``$PUSHT_ZARR`` or ``<repo>/../shared/data/pusht/pusht_cchi_v7_replay.zarr``.
    """
    path = Path(os.environ.get("PUSHT_ZARR", DEFAULT_ZARR))
    if not path.exists():
        pytest.skip(f"real Push-T data not found at {path} (set PUSHT_ZARR to its .zarr folder)")
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {
        "state": np.asarray(root["data/state"][:]),  # (N, 5)
        "keypoint": np.asarray(root["data/keypoint"][:]),  # (N, 9, 2)
        "action": np.asarray(root["data/action"][:]),  # (N, 2)
        "episode_ends": np.asarray(root["meta/episode_ends"][:]),  # (E,)
    }
