"""An in-memory replay buffer of episodes, read from and written to zarr stores.

Layout (the authors' layout): ``data/<key>`` arrays of shape ``(n_steps, ...)`` that concatenate
all episodes along time, and ``meta/episode_ends`` (int64, exclusive end index of each episode).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from diffusion_policy.data.errors import DatasetError, DatasetNotFoundError

log = logging.getLogger(__name__)

# Rows read per step when loading: about this many bytes, so converting a large array (the
# 2.8 GB float32 Push-T images to uint8) never holds more than one block in the source dtype.
_LOAD_BLOCK_BYTES = 64 << 20
# Target size of one saved chunk along time (uncompressed).
_SAVE_CHUNK_BYTES = 4 << 20


class ReplayBuffer:
    """Episodes of equal-length-per-step arrays, all held in RAM as numpy arrays.

    Args:
        data: ``{key: (n_steps, ...)}``; every array has ``episode_ends[-1]`` rows.
        episode_ends: Exclusive end index of each episode, strictly increasing.

    Raises:
        DatasetError: If the ends are not strictly increasing or an array's length disagrees.
    """

    def __init__(self, data: Mapping[str, np.ndarray], episode_ends: np.ndarray) -> None:
        ends = np.asarray(episode_ends)
        _check_episode_ends(ends)
        n_steps = int(ends[-1]) if len(ends) else 0
        for key, arr in data.items():
            if len(arr) != n_steps:
                raise DatasetError(
                    f"array {key!r} has {len(arr)} steps but episode_ends[-1] is {n_steps}"
                )
        self._data: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in data.items()}
        self._episode_ends = ends.astype(np.int64)
        # Episodes appended since the last read, concatenated lazily (see _consolidate).
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in self._data}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create_empty(cls) -> ReplayBuffer:
        """Returns a buffer with no episodes and no keys; the first episode sets the keys."""
        return cls({}, np.zeros(0, dtype=np.int64))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        keys: list[str] | None = None,
        dtypes: Mapping[str, np.dtype | type | str] | None = None,
    ) -> ReplayBuffer:
        """Loads a zarr store (format 2 or 3) into RAM.

        Args:
            path: The store folder, holding ``data/<key>`` and ``meta/episode_ends``.
            keys: The ``data/`` keys to load; all of them if None.
            dtypes: Optional ``{key: dtype}`` to convert on load, chunk by chunk. The conversion
                must be lossless (e.g. float32 images holding integers 0..255 -> uint8).

        Returns:
            The loaded buffer.

        Raises:
            DatasetNotFoundError: If ``path`` does not exist.
            DatasetError: If the store lacks ``meta/episode_ends`` or a requested key, an array's
                length disagrees with the episode ends, or a conversion would lose information.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise DatasetNotFoundError(f"no zarr store at {path}")
        try:
            root = zarr.open_group(str(path), mode="r")
        except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as e:
            raise DatasetError(f"{path} is not a readable zarr group ({e})") from e
        if "meta/episode_ends" not in root:
            raise DatasetError(f"zarr store {path} has no meta/episode_ends array")
        available = sorted(root["data"].array_keys()) if "data" in root else []
        keys = available if keys is None else list(keys)
        missing = [k for k in keys if k not in available]
        if missing:
            raise DatasetError(
                f"zarr store {path} has no data/{missing[0]}; available keys: {available}"
            )
        dtypes = dict(dtypes or {})
        unknown = sorted(set(dtypes) - set(keys))
        if unknown:
            raise DatasetError(f"dtypes given for keys {unknown} that are not loaded: {keys}")

        ends = np.asarray(root["meta/episode_ends"][:])
        try:
            _check_episode_ends(ends)
        except DatasetError as e:
            raise DatasetError(f"zarr store {path}: {e}") from e
        n_steps = int(ends[-1]) if len(ends) else 0
        data = {}
        for key in keys:
            arr = root[f"data/{key}"]
            if arr.shape[0] != n_steps:
                raise DatasetError(
                    f"zarr store {path}: data/{key} has {arr.shape[0]} steps but "
                    f"meta/episode_ends[-1] is {n_steps}"
                )
            data[key] = _load_array(arr, np.dtype(dtypes.get(key, arr.dtype)), key)
        log.info("loaded %s: %d episodes, %d steps, keys %s", path, len(ends), n_steps, keys)
        return cls(data, ends)

    # -- access -------------------------------------------------------------------------------
    @property
    def n_episodes(self) -> int:
        """Number of episodes."""
        return len(self._episode_ends)

    @property
    def n_steps(self) -> int:
        """Total number of steps over all episodes."""
        return int(self._episode_ends[-1]) if self.n_episodes else 0

    @property
    def episode_ends(self) -> np.ndarray:
        """Exclusive end index of each episode, ``(n_episodes,)`` int64 (a copy)."""
        return self._episode_ends.copy()

    @property
    def episode_lengths(self) -> np.ndarray:
        """Number of steps of each episode, ``(n_episodes,)`` int64."""
        return np.diff(self._episode_ends, prepend=0)

    def keys(self) -> list[str]:
        """The data keys, in insertion order."""
        return list(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __getitem__(self, key: str) -> np.ndarray:
        """The full ``(n_steps, ...)`` array of ``key``."""
        if key not in self._data:
            raise KeyError(f"replay buffer has no key {key!r}; keys: {self.keys()}")
        self._consolidate()
        return self._data[key]

    def episode_slice(self, idx: int) -> slice:
        """The step range of episode ``idx`` (negative counts from the end)."""
        n = self.n_episodes
        if not -n <= idx < n:
            raise IndexError(f"episode index {idx} out of range for {n} episodes")
        idx %= n
        start = int(self._episode_ends[idx - 1]) if idx > 0 else 0
        return slice(start, int(self._episode_ends[idx]))

    def get_episode(self, idx: int) -> dict[str, np.ndarray]:
        """The arrays of episode ``idx``: ``{key: (episode_len, ...)}`` (views, not copies)."""
        sl = self.episode_slice(idx)
        self._consolidate()
        return {k: v[sl] for k, v in self._data.items()}

    # -- writing ------------------------------------------------------------------------------
    def add_episode(self, data: Mapping[str, np.ndarray]) -> None:
        """Appends one episode.

        Args:
            data: ``{key: (episode_len, ...)}`` with the buffer's keys (any keys if the buffer
                is empty), all of the same length >= 1 and of the stored per-step shape.

        Raises:
            DatasetError: If the keys, lengths or per-step shapes do not match.
        """
        arrays = {k: np.asarray(v) for k, v in data.items()}
        if self._data and set(arrays) != set(self._data):
            raise DatasetError(
                f"episode keys {sorted(arrays)} differ from the buffer's keys {sorted(self._data)}"
            )
        if not arrays:
            raise DatasetError("an episode needs at least one array")
        lengths = {k: len(v) for k, v in arrays.items()}
        length = next(iter(lengths.values()))
        if length == 0 or any(n != length for n in lengths.values()):
            raise DatasetError(f"episode arrays must share one length >= 1; got {lengths}")
        if not self._data:  # First episode: it defines the keys.
            self._data = {k: v[:0].copy() for k, v in arrays.items()}
            self._pending = {k: [] for k in arrays}
        for key, arr in arrays.items():
            if arr.shape[1:] != self._data[key].shape[1:]:
                raise DatasetError(
                    f"episode array {key!r} has per-step shape {arr.shape[1:]}, "
                    f"the buffer stores {self._data[key].shape[1:]}"
                )
        for key, arr in arrays.items():
            self._pending[key].append(arr.astype(self._data[key].dtype, copy=True))
        self._episode_ends = np.append(self._episode_ends, self.n_steps + length)

    def _consolidate(self) -> None:
        """Concatenates pending episodes once, so appending many episodes stays linear."""
        for key, parts in self._pending.items():
            if parts:
                self._data[key] = np.concatenate([self._data[key], *parts])
                parts.clear()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the buffer as a zarr format-2 store (readable by the authors' tools).

        Arrays are Blosc/zstd compressed and chunked along time (about 4 MB per chunk). The
        store is written to a temporary sibling folder and moved into place, so after a crash
        ``path`` holds either the complete old store, the complete new one, or nothing.

        Args:
            path: The store folder to create or replace.

        Returns:
            The store path.
        """
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp = path.with_name(f".{path.name}.tmp-{tag}")
        try:
            self._write(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{tag}")
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except OSError:
                    os.replace(old, path)  # Put the old store back.
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("saved %d episodes (%d steps) to %s", self.n_episodes, self.n_steps, path)
        return path

    def _write(self, path: Path) -> None:
        self._consolidate()
        compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        for key, arr in self._data.items():
            row_bytes = max(1, arr[:1].nbytes if len(arr) else arr.itemsize)
            rows = int(np.clip(_SAVE_CHUNK_BYTES // row_bytes, 1, max(1, len(arr))))
            out = root.create_array(
                f"data/{key}",
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=(rows, *arr.shape[1:]),
                compressors=compressor,
            )
            if len(arr):
                out[...] = arr
        ends = root.create_array(
            "meta/episode_ends",
            shape=self._episode_ends.shape,
            dtype=np.int64,
            chunks=(max(1, self.n_episodes),),
            compressors=compressor,
        )
        if self.n_episodes:
            ends[...] = self._episode_ends

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(n_episodes={self.n_episodes}, n_steps={self.n_steps}, "
            f"keys={self.keys()})"
        )


def _check_episode_ends(ends: np.ndarray) -> None:
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        raise DatasetError(
            f"episode_ends must be a 1-D integer array; got shape {ends.shape}, dtype {ends.dtype}"
        )
    steps = np.diff(ends, prepend=0)
    bad = np.flatnonzero(steps <= 0)
    if len(bad):
        i = int(bad[0])
        prev = int(ends[i - 1]) if i > 0 else 0
        raise DatasetError(
            f"episode_ends must be strictly increasing from > 0; "
            f"episode_ends[{i}]={int(ends[i])} after {prev}"
        )


def _load_array(arr: zarr.Array, dtype: np.dtype, key: str) -> np.ndarray:
    """Reads a zarr array block by block into a preallocated array of ``dtype``."""
    out = np.empty(arr.shape, dtype=dtype)
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    chunk_rows = arr.chunks[0] if arr.ndim else 1
    rows = max(chunk_rows, _LOAD_BLOCK_BYTES // row_bytes // chunk_rows * chunk_rows)
    convert = dtype != arr.dtype
    for start in range(0, arr.shape[0], rows):
        block = arr[start : start + rows]
        if convert:
            with np.errstate(invalid="ignore", over="ignore"):
                cast = block.astype(dtype)
            if not np.array_equal(cast.astype(block.dtype), block, equal_nan=True):
                raise DatasetError(
                    f"converting data/{key} from {arr.dtype} to {dtype} loses information "
                    f"(steps {start}..{start + len(block) - 1} hold values it cannot represent)"
                )
            block = cast
        out[start : start + len(block)] = block
    return out
