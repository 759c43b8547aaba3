"""The policy server's messages: msgpack maps, numpy arrays as ``{dtype, shape, bytes}``.

An array travels as ``{"__ndarray__": true, "dtype": "<f4", "shape": [B, To, D], "data": bytes}``
(little-endian, C order): compact, no pickling, readable from any language with msgpack. Decoding
trusts nothing: the size is bounded before parsing, only plain numeric dtypes are accepted, and
the bytes must match the shape exactly.

A request is ``{"v": 1, "id": int, "method": str, ...}`` (``"token"`` when the server wants one);
a reply is ``{"v": 1, "id": int | None, "ok": bool, ...}``, with ``"error"`` when not ok.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import torch

VERSION = 1
ARRAY_TAG = "__ndarray__"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 2**20
# Plain numeric dtypes, little-endian: what observations and actions are made of.
DTYPES = ("|b1", "|u1", "|i1", "<i2", "<i4", "<i8", "<u2", "<u4", "<f2", "<f4", "<f8")
MAX_NDIM = 8


class WireError(ValueError):
    """A message that cannot be decoded or does not follow the protocol."""


def encode(message: dict[str, Any]) -> bytes:
    """Packs a map whose values may hold numpy arrays or torch tensors."""
    return msgpack.packb(message, default=_pack_array, use_bin_type=True)


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Unpacks a message into a dict, arrays as read-only numpy arrays.

    Raises:
        WireError: Oversized, not msgpack, not a map, or an array that is malformed.
    """
    if len(payload) > max_bytes:
        raise WireError(f"message of {len(payload)} bytes is over the limit of {max_bytes}")
    try:
        message = msgpack.unpackb(
            payload,
            raw=False,
            object_hook=_unpack_array,
            strict_map_key=True,
        )
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types for corrupt input
        raise WireError(f"not a msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(message, dict):
        raise WireError(f"a message must be a map, got {type(message).__name__}")
    return message


def _pack_array(obj: Any) -> dict[str, Any]:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.generic):
        return obj.item()
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"cannot encode a {type(obj).__name__}")
    array = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
    if array.dtype.str not in DTYPES:
        raise TypeError(f"cannot encode an array of dtype {obj.dtype}; use one of {DTYPES}")
    return {ARRAY_TAG: True, "dtype": array.dtype.str, "shape": list(array.shape),
            "data": array.tobytes()}  # fmt: skip


def _unpack_array(obj: dict[str, Any]) -> Any:
    if ARRAY_TAG not in obj:
        return obj
    if set(obj) != {ARRAY_TAG, "dtype", "shape", "data"}:
        raise WireError(f"an array must have the keys dtype, shape, data; got {sorted(obj)}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in DTYPES:
        raise WireError(f"array dtype={dtype!r} is not one of {DTYPES}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise WireError(f"array shape={shape!r} must be a list of at most {MAX_NDIM} ints >= 0")
    if not isinstance(data, bytes):
        raise WireError(f"array data must be bytes, got {type(data).__name__}")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise WireError(f"array of shape {shape} and dtype {dtype} needs {expected} bytes, "
                        f"got {len(data)}")  # fmt: skip
    return np.frombuffer(data, dtype=dtype).reshape(shape)
