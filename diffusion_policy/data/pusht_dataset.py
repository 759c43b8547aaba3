"""Push-T datasets over the authors' replay buffer ``pusht_cchi_v7_replay.zarr``."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from diffusion_policy.data.sequence_dataset import Field, SequenceDataset, flatten_steps


def agent_pos_from_state(state: np.ndarray) -> np.ndarray:
    """``data/state`` (n_steps, 5) -> agent x, y (n_steps, 2)."""
    return state[:, :2]


class PushTKeypointDataset(SequenceDataset):
    """Push-T with low-dim observations: 9 block keypoints (flattened to 18) and agent x, y.

    Samples: ``{"obs": {"keypoint": (To, 18), "agent_pos": (To, 2)}, "action": (T, 2)}``,
    float32, in pixels. See :class:`SequenceDataset` for the arguments.
    """

    obs_fields: ClassVar[dict[str, Field]] = {
        "keypoint": Field("keypoint", flatten_steps),
        "agent_pos": Field("state", agent_pos_from_state),
    }
    action_field: ClassVar[Field] = Field("action")
