"""The BlockPush low-dim dataset over the oracle's demonstration store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from diffusion_policy.data.keys import ACTION, OBS
from diffusion_policy.data.sequence_dataset import Field, SequenceDataset
from diffusion_policy.envs.blockpush_actions import absolute_actions

DEFAULT_BLOCKPUSH_PATH = Path("data") / "blockpush" / "blockpush_oracle.zarr"


class BlockPushLowdimDataset(SequenceDataset):
    """BlockPush with the env's 16-value observation and 2-D actions (metres).

    Samples: ``{"obs": {"obs": (To, 16)}, "action": (T, 2)}``, float32; the observation key is
    ``"obs"``, the one the rollout runner gives a non-dict observation. Actions are the stored
    relative moves (dx, dy), or with ``abs_action`` the effector targets they set (x, y), for an
    env built with ``abs_action``. A store that is absent is generated first with the scripted
    oracle (``generate_episodes`` episodes from seed ``generate_seed``; minutes for 1,000). See
    :class:`SequenceDataset` for the other arguments.
    """

    obs_fields: ClassVar[dict[str, Field]] = {OBS: Field("obs")}
    zarr_shapes: ClassVar[dict[str, tuple[int | None, ...]]] = {"obs": (16,), ACTION: (2,)}

    def __init__(
        self,
        zarr_path: str = str(DEFAULT_BLOCKPUSH_PATH),
        generate_episodes: int = 1000,
        generate_seed: int = 0,
        abs_action: bool = False,
        **kwargs: Any,
    ) -> None:
        self.generate_episodes = generate_episodes
        self.generate_seed = generate_seed
        self.abs_action = abs_action
        super().__init__(zarr_path, **kwargs)

    def combine_fields(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """With ``abs_action``, the actions become the targets they set."""
        if self.abs_action:
            arrays = {**arrays, ACTION: absolute_actions(arrays[OBS], arrays[ACTION])}
        return arrays

    def prepare_store(self, zarr_path: str) -> str:
        """Generates the store with the scripted oracle when it is absent."""
        if not Path(zarr_path).expanduser().exists():
            # Imported here: only generating needs the simulator (pybullet).
            from diffusion_policy.envs.blockpush_oracle import ensure_blockpush_dataset

            ensure_blockpush_dataset(
                zarr_path, n_episodes=self.generate_episodes, seed=self.generate_seed
            )
        return zarr_path
