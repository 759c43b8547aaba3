"""The BlockPush low-dim dataset over the oracle's demonstration store."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffusion_policy.data.keys import ACTION, OBS
from diffusion_policy.data.sequence_dataset import Field, SequenceDataset
from diffusion_policy.envs.blockpush_actions import (
    WORKSPACE_CENTER,
    absolute_actions,
    move_scene,
    scale_own_motion,
)


def blockpush_store_path(layout: str = "paper") -> Path:
    """Where the oracle's store for ``layout`` lives by default (relative to the project).

    ``_v3``: demonstrations of the oracle that turns blocks face-on before pushing, with the
    pusher's contact friction of the paper's setting; stores of earlier oracles or physics
    (``blockpush_<layout>.zarr``, ``_v2``) are not read.
    """
    return Path("data") / "blockpush" / f"blockpush_{layout}_v3.zarr"


DEFAULT_BLOCKPUSH_PATH = blockpush_store_path()


class BlockPushLowdimDataset(SequenceDataset):
    """BlockPush with the env's 16-value observation and 2-D actions (metres).

    Samples: ``{"obs": {"obs": (To, 16)}, "action": (T, 2)}``, float32; the observation key is
    ``"obs"``, the one the rollout runner gives a non-dict observation. Actions are the stored
    relative moves (dx, dy), or with ``abs_action`` the effector targets they set (x, y), for an
    env built with ``abs_action``. A store that is absent is generated first with the scripted
    oracle (``generate_episodes`` episodes from seed ``generate_seed`` on the env's ``layout``,
    "paper" or "wide", with detours at ``generate_detour_prob`` per step and drifts at
    ``generate_drift_prob`` per pushing step, see
    :func:`~diffusion_policy.envs.blockpush_oracle.run_oracle_episode`; minutes for 1,000).

    With ``augment_angle_deg`` or ``augment_shift`` (``abs_action`` only), every training window
    is drawn rotated about the workspace centre by up to that angle and shifted by up to that
    many metres per axis (uniformly, from torch's generator): the same pushes in new layouts.
    The validation windows stay as recorded; the normalizer covers the moved scenes.

    With ``augment_own_motion`` (at most 2), the older frames of every training window show the
    pusher's own motion (its effector and commanded target) scaled by a uniform factor in
    ``[1 - augment_own_motion, 1 + augment_own_motion]``
    (:func:`~diffusion_policy.envs.blockpush_actions.scale_own_motion`): the pusher's recent
    speed then tells little about its next move, against the copycat shortcut of a policy that
    keeps its own pace (docs/tasks.md). See :class:`SequenceDataset` for the other arguments.
    """

    obs_fields: ClassVar[dict[str, Field]] = {OBS: Field("obs")}
    zarr_shapes: ClassVar[dict[str, tuple[int | None, ...]]] = {"obs": (16,), ACTION: (2,)}

    def __init__(
        self,
        zarr_path: str = str(DEFAULT_BLOCKPUSH_PATH),
        generate_episodes: int = 1000,
        generate_seed: int = 0,
        generate_detour_prob: float = 0.0,
        generate_drift_prob: float = 0.0,
        layout: str = "paper",
        abs_action: bool = False,
        augment_angle_deg: float = 0.0,
        augment_shift: float = 0.0,
        augment_own_motion: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if (augment_angle_deg or augment_shift) and not abs_action:
            raise ValueError(
                "augment_angle_deg / augment_shift move the scene's absolute positions: they "
                "need abs_action=true (actions as targets, not moves)"
            )
        if augment_angle_deg < 0 or augment_shift < 0:
            raise ValueError(
                f"augment_angle_deg={augment_angle_deg} and augment_shift={augment_shift} "
                f"must be >= 0"
            )
        if not 0 <= augment_own_motion <= 2:
            raise ValueError(f"augment_own_motion={augment_own_motion} must be in [0, 2]")
        self.generate_episodes = generate_episodes
        self.generate_seed = generate_seed
        self.generate_detour_prob = generate_detour_prob
        self.generate_drift_prob = generate_drift_prob
        self.layout = layout
        self.abs_action = abs_action
        self.augment_angle = math.radians(augment_angle_deg)
        self.augment_shift = augment_shift
        self.augment_own_motion = augment_own_motion
        super().__init__(zarr_path, **kwargs)

    @property
    def augments(self) -> bool:
        return bool(self.augment_angle or self.augment_shift)

    def _moves(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Random rotations (n,) and shifts (n, 2) within the augmentation bounds."""
        angle = (torch.rand(n, generator=generator) * 2 - 1) * self.augment_angle
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * self.augment_shift
        return angle, shift

    def _to_batch(self, sample: dict[str, np.ndarray]) -> dict[str, Any]:
        batch = super()._to_batch(sample)
        if not (self.augments or self.augment_own_motion):
            return batch
        obs, action = batch[OBS][OBS], batch[ACTION]
        single = obs.ndim == 2  # one window: (To, 16), (T, 2)
        if single:
            obs, action = obs[None], action[None]
        if self.augments:
            obs, action = move_scene(obs, action, *self._moves(len(obs)))
        if self.augment_own_motion:
            scale = 1 + (torch.rand(len(obs)) * 2 - 1) * self.augment_own_motion  # (B,)
            obs = scale_own_motion(obs, scale)
        if single:
            obs, action = obs[0], action[0]
        return {OBS: {OBS: obs}, ACTION: action}

    def get_validation_dataset(self) -> BlockPushLowdimDataset:
        """The validation windows, as recorded (not augmented)."""
        val = super().get_validation_dataset()
        val.augment_angle, val.augment_shift, val.augment_own_motion = 0.0, 0.0, 0.0
        return val

    def get_normalizer_data(
        self, action_origin: Mapping[str, Sequence[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """As :meth:`SequenceDataset.get_normalizer_data`; when augmenting, with 4 randomly moved
        copies of every step (a fixed seed) added, so the ranges cover the moved scenes."""
        data = super().get_normalizer_data(action_origin)
        if not self.augments:
            return data
        g = torch.Generator().manual_seed(0)
        obs = torch.from_numpy(data[OBS])[:, None]  # (N, 1, 16)
        action = torch.from_numpy(data[ACTION])[:, None]  # (N, 1, 2)
        all_obs, all_actions = [data[OBS]], [data[ACTION]]
        centre = torch.tensor(WORKSPACE_CENTER, dtype=action.dtype)
        for _ in range(4):
            angle, shift = self._moves(len(obs), g)
            moved_obs, moved = move_scene(obs, action, angle, shift)
            if action_origin:  # offsets turn with the scene (about the centre) and do not shift
                _, moved = move_scene(obs, action + centre, angle, torch.zeros_like(shift))
                moved = moved - centre
            all_obs.append(moved_obs[:, 0].numpy())
            all_actions.append(moved[:, 0].numpy())
        return {**data, OBS: np.concatenate(all_obs), ACTION: np.concatenate(all_actions)}

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
                zarr_path,
                n_episodes=self.generate_episodes,
                seed=self.generate_seed,
                layout=self.layout,
                detour_prob=self.generate_detour_prob,
                drift_prob=self.generate_drift_prob,
            )
        return zarr_path
