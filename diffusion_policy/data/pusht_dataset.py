"""Push-T datasets over the authors' replay buffer ``pusht_cchi_v7_replay.zarr``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from diffusion_policy.data.download import ensure_dataset
from diffusion_policy.data.keys import RGB
from diffusion_policy.data.sequence_dataset import Field, SequenceDataset, flatten_steps


def agent_pos_from_state(state: np.ndarray) -> np.ndarray:
    """``data/state`` (n_steps, 5) -> agent x, y (n_steps, 2)."""
    return state[:, :2]


class PushTDataset(SequenceDataset):
    """The authors' Push-T store, downloaded to its default location on first use."""

    def prepare_store(self, zarr_path: str) -> Path:
        return ensure_dataset(zarr_path)


class PushTKeypointDataset(PushTDataset):
    """Push-T with low-dim observations: 9 block keypoints (flattened to 18) and agent x, y.

    Samples: ``{"obs": {"keypoint": (To, 18), "agent_pos": (To, 2)}, "action": (T, 2)}``,
    float32, in pixels. See :class:`SequenceDataset` for the arguments.
    """

    obs_fields: ClassVar[dict[str, Field]] = {
        "keypoint": Field("keypoint", flatten_steps),
        "agent_pos": Field("state", agent_pos_from_state),
    }
    # The authors' layout, by zarr array name; a store of another one is refused with the key and
    # shape named. The action comes from data/action (SequenceDataset's default action_field).
    zarr_shapes: ClassVar[dict[str, tuple[int | None, ...]]] = {
        "keypoint": (9, 2),
        "state": (5,),
        "action": (2,),
    }


class PushTImageDataset(PushTDataset):
    """Push-T with image observations: the 96x96 RGB frame and agent x, y.

    Samples: ``{"obs": {"image": uint8 (To, 96, 96, 3), "agent_pos": float32 (To, 2)},
    "action": float32 (T, 2)}``. Images keep the store's channels-last layout, which is also the
    env's, and stay uint8 in memory: the authors' store holds float32 integers 0..255, converted
    on load block by block (lossless, checked), so all 25,650 frames take 0.71 GB instead of
    2.8 GB. The encoder makes them float, per batch. See :class:`SequenceDataset` for the
    arguments.
    """

    obs_fields: ClassVar[dict[str, Field]] = {
        "image": Field("img", type=RGB),
        "agent_pos": Field("state", agent_pos_from_state),
    }
    load_dtypes: ClassVar[dict[str, Any]] = {"img": np.uint8}
    zarr_shapes: ClassVar[dict[str, tuple[int | None, ...]]] = {
        "img": (None, None, 3),
        "state": (5,),
        "action": (2,),
    }
