"""A torch dataset of padded windows over a zarr replay buffer; subclasses name the fields."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion_policy.data.action_origin import parse_action_origin, relative_window_actions
from diffusion_policy.data.errors import DatasetError
from diffusion_policy.data.keys import ACTION, LOW_DIM, OBS
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.data.sampler import SequenceSampler
from diffusion_policy.data.split import split_episodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Field:
    """How one dataset field is made from a stored array.

    Args:
        zarr_key: The ``data/<key>`` array it comes from.
        transform: Applied once at load to the whole ``(n_steps, ...)`` array, e.g. to flatten
            or select columns; identity if None.
        type: ``"low_dim"`` (float32, normalized by the policy) or another observation type
            such as ``"rgb"`` (kept in its stored dtype).
    """

    zarr_key: str
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    type: str = LOW_DIM


def flatten_steps(x: np.ndarray) -> np.ndarray:
    """``(n_steps, ...)`` -> ``(n_steps, D)``."""
    return x.reshape(len(x), -1)


class SequenceDataset(Dataset):
    """Windows ``{"obs": {key: (To, ...)}, "action": (T, Da)}`` over the train episodes.

    Subclasses set ``obs_fields`` (obs key -> :class:`Field`), ``action_field``, for keys to
    convert on load ``load_dtypes`` (zarr key -> dtype) and, to refuse a store of another layout
    with a clear error, ``zarr_shapes`` (zarr key -> per-step shape, ``None`` for any size).
    Samples are float32 tensors for low-dim fields; other observation types keep their stored
    dtype.

    Besides ``__getitem__``, :meth:`get_batch` (also reachable as ``__getitems__``, which a
    ``DataLoader`` with a pass-through ``collate_fn`` calls) builds a whole batch by fancy
    indexing, without per-sample collation.

    Args:
        zarr_path: The replay buffer store.
        horizon: Window length T.
        n_obs_steps: Observed frames To.
        n_action_steps: Actions executed per policy call (sets the padding after episode ends).
        val_ratio: Fraction of episodes held out for validation.
        seed: Seed of the episode split.
        max_train_episodes: Keep at most this many train episodes (None: all).
    """

    obs_fields: ClassVar[dict[str, Field]] = {}
    action_field: ClassVar[Field] = Field(ACTION)
    load_dtypes: ClassVar[dict[str, Any]] = {}
    zarr_shapes: ClassVar[dict[str, tuple[int | None, ...]]] = {}

    def __init__(
        self,
        zarr_path: str,
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        val_ratio: float = 0.02,
        seed: int = 42,
        max_train_episodes: int | None = None,
    ) -> None:
        zarr_path = str(self.prepare_store(zarr_path))
        fields = {**self.obs_fields, ACTION: self.action_field}
        zarr_keys = list(dict.fromkeys(f.zarr_key for f in fields.values()))
        buffer = ReplayBuffer.open(
            zarr_path, keys=zarr_keys, dtypes=self.load_dtypes, shapes=self.zarr_shapes
        )
        if buffer.n_episodes == 0:
            raise DatasetError(
                f"zarr store {zarr_path} has no episodes (meta/episode_ends is empty): "
                f"nothing to train on"
            )
        self.arrays: dict[str, np.ndarray] = {}
        for name, f in fields.items():
            arr = buffer[f.zarr_key] if f.transform is None else f.transform(buffer[f.zarr_key])
            if f.type == LOW_DIM:
                arr = arr.astype(np.float32, copy=False)
            self.arrays[name] = np.ascontiguousarray(arr)
        self.arrays = self.combine_fields(self.arrays)
        self.episode_ends = buffer.episode_ends
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.train_mask, self.val_mask = split_episodes(
            len(self.episode_ends), val_ratio, seed, max_train_episodes
        )
        self.sampler = self._make_sampler(self.train_mask)
        self._check_episode_lengths(zarr_path)

    def prepare_store(self, zarr_path: str) -> str | Path:
        """Makes the store at ``zarr_path`` available and returns where it is.

        The default takes the path as given (opening a missing store is a clear error). A task
        whose demonstrations can be downloaded or generated overrides this; the trainer builds
        the dataset on rank 0 first, so only one process does that.
        """
        return zarr_path

    def combine_fields(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Returns the loaded fields, changed where one needs another (default: as they are).

        Runs once at load, after each :class:`Field`'s own transform and before windowing, e.g.
        to turn relative actions into absolute ones with the observed positions.
        """
        return arrays

    def _check_episode_lengths(self, zarr_path: str) -> None:
        """Refuses a split whose train episodes are all too short for one window; warns for some.

        A window may extend ``n_obs_steps - 1`` steps before an episode and ``n_action_steps - 1``
        after it (edge frames repeated), so an episode needs at least ``horizon`` minus those
        steps; shorter ones are dropped, not padded further.
        """
        need = self.horizon - (self.n_obs_steps - 1) - (self.n_action_steps - 1)
        lengths = np.diff(self.episode_ends, prepend=0)[self.train_mask]
        short = lengths[lengths < need]
        if not len(short):
            return
        why = (
            f"a window needs {need} steps of an episode (horizon={self.horizon}, padded by "
            f"n_obs_steps - 1 = {self.n_obs_steps - 1} repeated first frames and "
            f"n_action_steps - 1 = {self.n_action_steps - 1} repeated last frames); shorter "
            f"episodes are dropped, not padded further"
        )
        if len(short) == len(lengths):
            raise DatasetError(
                f"zarr store {zarr_path}: no training windows: all {len(lengths)} train "
                f"episodes are too short, episode lengths {_describe(lengths)}; {why}"
            )
        log.warning(
            "%s: %d of %d train episodes are dropped, lengths %s; %s",
            zarr_path,
            len(short),
            len(lengths),
            _describe(short),
            why,
        )

    def _make_sampler(self, episode_mask: np.ndarray) -> SequenceSampler:
        return SequenceSampler(
            self.arrays,
            self.episode_ends,
            horizon=self.horizon,
            n_obs_steps=self.n_obs_steps,
            n_action_steps=self.n_action_steps,
            obs_keys=self.obs_fields,
            episode_mask=episode_mask,
        )

    def get_validation_dataset(self) -> SequenceDataset:
        """The same data windowed over the validation episodes (arrays are shared, not copied)."""
        val = copy.copy(self)
        val.sampler = self._make_sampler(self.val_mask)
        return val

    @property
    def shape_meta(self) -> dict[str, Any]:
        """``{"obs": {key: {"shape": [...], "type": ...}}, "action": {"shape": [Da]}}``."""
        obs = {
            k: {"shape": list(self.arrays[k].shape[1:]), "type": f.type}
            for k, f in self.obs_fields.items()
        }
        return {OBS: obs, ACTION: {"shape": list(self.arrays[ACTION].shape[1:])}}

    def get_normalizer_data(
        self, action_origin: Mapping[str, Sequence[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """The low-dim fields and action over the train episodes' steps: ``{key: (N, D)}``.

        Args:
            action_origin: The policy's relative-action origin (see
                :mod:`~diffusion_policy.data.action_origin`); the action entry is then every
                train window's actions relative to its current frame, as the policy sees them.
        """
        lengths = np.diff(self.episode_ends, prepend=0)
        steps = np.repeat(self.train_mask, lengths)  # (n_steps,) bool
        keys = [k for k, f in self.obs_fields.items() if f.type == LOW_DIM] + [ACTION]
        data = {k: flatten_steps(self.arrays[k][steps]) for k in keys}
        origin = parse_action_origin(action_origin, self.shape_meta)
        if origin is not None:
            key, dims = origin
            data[ACTION] = relative_window_actions(
                self.arrays[key], self.arrays[ACTION], self.sampler.indices, self.n_obs_steps, dims
            )
        return data

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self._to_batch(self.sampler.sample(idx))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Windows ``indices`` as one batch.

        Returns:
            ``{"obs": {key: (B, To, ...)}, "action": (B, T, Da)}`` of tensors.
        """
        return self._to_batch(self.sampler.sample_batch(np.asarray(indices)))

    __getitems__ = get_batch

    def _to_batch(self, sample: dict[str, np.ndarray]) -> dict[str, Any]:
        tensors = {k: torch.from_numpy(v) for k, v in sample.items()}
        return {OBS: {k: tensors[k] for k in self.obs_fields}, ACTION: tensors[ACTION]}


def _describe(lengths: np.ndarray) -> str:
    """``[3, 5]`` for a few lengths, ``3..40 (120 episodes)`` for many."""
    if len(lengths) <= 8:
        return str([int(n) for n in lengths])
    return f"{int(lengths.min())}..{int(lengths.max())} ({len(lengths)} episodes)"
