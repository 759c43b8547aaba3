"""An in-memory replay buffer of episodes, read from and written to zarr stores.

Layout (the authors' layout): ``data/<key>`` arrays of shape ``(n_steps, ...)`` that concatenate
all episodes along time, and ``meta/episode_ends`` (int64, exclusive end index of each episode).

Opening a store validates it (see :meth:`ReplayBuffer.open`); every error names the key and the
step, episode or chunk at fault.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from diffusion_policy.data.errors import DatasetError, DatasetNotFoundError
from diffusion_policy.utils.atomic import atomic_write_dir

log = logging.getLogger(__name__)

# Rows read per step when loading: about this many bytes, so converting a large array (the
# 2.8 GB float32 Push-T images to uint8) never holds more than one block in the source dtype.
_LOAD_BLOCK_BYTES = 64 << 20
# Target size of one saved chunk along time (uncompressed).
_SAVE_CHUNK_BYTES = 4 << 20
# dtype kinds a data array may have: bool, signed and unsigned integers, floats.
_NUMERIC_KINDS = "biuf"


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
        shapes: Mapping[str, Sequence[int | None]] | None = None,
        check_finite: bool = True,
    ) -> ReplayBuffer:
        """Loads a zarr store (format 2 or 3) into RAM, validating it.

        Args:
            path: The store folder, holding ``data/<key>`` and ``meta/episode_ends``.
            keys: The ``data/`` keys to load; all of them if None.
            dtypes: Optional ``{key: dtype}`` to convert on load, chunk by chunk. The conversion
                must be lossless (e.g. float32 images holding integers 0..255 -> uint8).
            shapes: Optional ``{key: per-step shape}`` the arrays must have, ``None`` for a
                dimension of any size: ``{"keypoint": (9, 2), "img": (None, None, 3)}``.
            check_finite: Refuse NaN and inf in float arrays.

        Returns:
            The loaded buffer.

        Raises:
            DatasetNotFoundError: If ``path`` does not exist.
            DatasetError: If the store lacks ``meta/episode_ends`` or a requested key, the
                episode ends are not strictly increasing, an array's length disagrees with them,
                an array is not numeric or not of the expected per-step shape, a float array holds
                NaN or inf, a chunk cannot be decompressed, or a conversion would lose
                information. The message names the key and the index, episode or chunk.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise DatasetNotFoundError(f"no zarr store at {path}")
        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as e:  # zarr raises many types for a bad group
            raise DatasetError(f"{path} is not a readable zarr group ({e})") from None
        ends_arr = _get_node(root, "meta/episode_ends", path)
        if not isinstance(ends_arr, zarr.Array):
            raise DatasetError(f"zarr store {path} has no meta/episode_ends array")
        data_group = _get_node(root, "data", path)
        if data_group is not None and not isinstance(data_group, zarr.Group):
            raise DatasetError(f"zarr store {path}: data is not a group of arrays")
        try:
            available = sorted(data_group.array_keys()) if data_group is not None else []
        except Exception as e:  # an array's metadata is broken: find which, to name it
            folder = path / "data"
            names = keys or (sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [])
            for key in names:
                _get_node(root, f"data/{key}", path)
            raise DatasetError(
                f"zarr store {path}: cannot list the arrays in data/ ({e})"
            ) from None
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

        shapes = dict(shapes or {})
        try:
            ends = _read_array(ends_arr, "meta/episode_ends")
            _check_episode_ends(ends)
        except DatasetError as e:
            raise DatasetError(f"zarr store {path}: {e}") from None
        n_steps = int(ends[-1]) if len(ends) else 0
        data = {}
        for key in keys:
            arr = _get_node(root, f"data/{key}", path)
            try:
                _check_array(arr, key, n_steps, shapes.get(key))
                dtype = np.dtype(dtypes.get(key, arr.dtype))
                data[key] = _load_array(arr, dtype, key, ends, check_finite)
            except DatasetError as e:
                raise DatasetError(f"zarr store {path}: {e}") from None
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
        path = atomic_write_dir(Path(path).expanduser(), self._write)
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
                # Every chunk is a file, so a missing one means a damaged copy (see _check_array).
                config={"write_empty_chunks": True},
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


def _get_node(root: zarr.Group, name: str, path: Path) -> Any:
    """``root[name]``, None if absent; a node whose metadata cannot be read is a DatasetError."""
    try:
        return root.get(name)
    except Exception as e:  # broken metadata raises JSON, codec or value errors
        raise DatasetError(f"zarr store {path}: {name} cannot be opened ({e})") from None


def _check_array(arr: Any, key: str, n_steps: int, shape: Sequence[int | None] | None) -> None:
    """Checks a data array's kind, length, per-step shape and stored chunks before reading."""
    if not isinstance(arr, zarr.Array):
        raise DatasetError(f"data/{key} is not an array")
    if arr.ndim == 0 or arr.dtype.kind not in _NUMERIC_KINDS:
        raise DatasetError(
            f"data/{key} has shape {arr.shape} and dtype {arr.dtype}; expected a numeric "
            f"(bool, integer or float) array of shape (n_steps, ...)"
        )
    if arr.shape[0] != n_steps:
        raise DatasetError(
            f"data/{key} has {arr.shape[0]} steps but meta/episode_ends[-1] is {n_steps}"
        )
    if shape is not None:
        step_shape = tuple(arr.shape[1:])
        if len(step_shape) != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, step_shape, strict=False)
        ):
            want = tuple("any" if d is None else d for d in shape)
            raise DatasetError(f"data/{key} has per-step shape {step_shape}, expected {want}")
    n_stored = arr.nchunks_initialized
    if n_stored < arr.nchunks:
        # zarr reads a missing chunk as the fill value: right for stores written sparsely on
        # purpose, wrong for a partial copy. Say so rather than fail a valid store.
        log.warning(
            "data/%s: %d of %d chunks are not stored and read as the fill value %r; if this "
            "store was copied or downloaded, the copy may be incomplete",
            key,
            arr.nchunks - n_stored,
            arr.nchunks,
            arr.fill_value,
        )


def _read_array(arr: zarr.Array, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``arr[start:stop]``; a chunk that fails to decompress is named in a DatasetError."""
    try:
        return np.asarray(arr[start:stop] if arr.ndim else arr[()])
    except Exception as e:  # codecs raise RuntimeError, ValueError, ...
        if not arr.ndim:
            raise DatasetError(f"{name} cannot be read ({e})") from None
        stop = arr.shape[0] if stop is None else min(stop, arr.shape[0])
        chunk_rows = arr.chunks[0]
        for c_start in range(start - start % chunk_rows, stop, chunk_rows):
            try:
                arr[c_start : c_start + chunk_rows]
            except Exception as chunk_error:
                i = c_start // chunk_rows
                c_stop = min(c_start + chunk_rows, arr.shape[0]) - 1
                # from None: zarr's error sits under hundreds of lines of asyncio frames.
                raise DatasetError(
                    f"{name}: chunk {_chunk_key(arr, i)} (steps {c_start}..{c_stop}) is corrupt "
                    f"and cannot be read ({type(chunk_error).__name__}: {chunk_error})"
                ) from None
        raise DatasetError(f"{name} steps {start}..{stop - 1} cannot be read ({e})") from None


def _chunk_key(arr: zarr.Array, i: int) -> str:
    """The store key of the ``i``-th chunk along time, e.g. ``"3.0"`` (format 2)."""
    try:
        return repr(arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1)))
    except Exception:  # only for the message
        return str(i)


def _load_array(
    arr: zarr.Array, dtype: np.dtype, key: str, ends: np.ndarray, check_finite: bool = True
) -> np.ndarray:
    """Reads a zarr array block by block into a preallocated array of ``dtype``.

    Raises:
        DatasetError: A chunk is corrupt, a value is NaN/inf (float arrays, if
            ``check_finite``) or the conversion to ``dtype`` would lose information.
    """
    out = np.empty(arr.shape, dtype=dtype)
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    chunk_rows = arr.chunks[0] if arr.ndim else 1
    rows = max(chunk_rows, _LOAD_BLOCK_BYTES // row_bytes // chunk_rows * chunk_rows)
    convert = dtype != arr.dtype
    for start in range(0, arr.shape[0], rows):
        block = _read_array(arr, f"data/{key}", start, start + rows)
        if check_finite and block.dtype.kind == "f":
            _check_finite(block, key, start, ends)
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


def _check_finite(block: np.ndarray, key: str, start: int, ends: np.ndarray) -> None:
    """Raises a DatasetError naming the first NaN/inf of ``block`` (rows ``start..``)."""
    finite = np.isfinite(block)
    if finite.all():
        return
    idx = np.unravel_index(int(np.argmin(finite)), block.shape)
    step = start + int(idx[0])
    episode = int(np.searchsorted(ends, step, side="right"))
    index = ", ".join(str(int(i)) for i in (step, *idx[1:]))
    raise DatasetError(
        f"data/{key}[{index}] is {block[idx]} (step {step}, episode {episode}); "
        f"{int((~finite).sum())} non-finite values in steps {start}..{start + len(block) - 1}"
    )
