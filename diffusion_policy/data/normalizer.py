"""Per-key affine normalization to [-1, 1], stored as module buffers (so in checkpoints)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# A dimension whose range over the data is below this is treated as constant.
RANGE_EPS = 1e-4


class _KeyParams(nn.Module):
    """The affine map ``y = x * scale + offset`` of one key, plus the fitted input range."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("input_min", torch.zeros(dim))
        self.register_buffer("input_max", torch.zeros(dim))


class LinearNormalizer(nn.Module):
    """Maps each key's features to [-1, 1] per dimension with min/max statistics.

    Built with identity maps, so a policy can be constructed from its config and then load a
    checkpoint's ``state_dict``; :meth:`fit` sets the maps from data. A dimension that is
    constant in the data (range < ``RANGE_EPS``) gets scale 1 and an offset that maps the
    constant to 0, instead of dividing by a near-zero range.

    Args:
        dims: ``{key: D}``, the flat feature size of each key. Inputs are ``(..., D)``.
    """

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        for key, dim in dims.items():
            if "." in key or not key:
                raise ValueError(f"normalizer key {key!r} must be non-empty and contain no '.'")
            if int(dim) < 1:
                raise ValueError(f"normalizer dim of {key!r} is {dim}; must be >= 1")
        self.dims = {k: int(d) for k, d in dims.items()}
        self.params = nn.ModuleDict({k: _KeyParams(d) for k, d in self.dims.items()})

    @torch.no_grad()
    def fit(self, data: Mapping[str, np.ndarray | Tensor]) -> None:
        """Sets the maps of the given keys from per-dimension min/max over all leading axes.

        Args:
            data: ``{key: (..., D)}``; keys not given keep their current map (a warning is
                logged).
        """
        for key, value in data.items():
            x = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
            x = self._check(key, x).reshape(-1, self.dims[key])  # (N, D)
            if len(x) == 0:
                raise ValueError(f"cannot fit normalizer key {key!r} on 0 samples")
            x = x.detach().to("cpu", torch.float64)
            lo, hi = x.min(0).values, x.max(0).values  # (D,)
            span = hi - lo
            constant = span < RANGE_EPS
            scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(RANGE_EPS))
            offset = torch.where(constant, -lo, -1.0 - lo * scale)
            p = self.params[key]
            p.scale.copy_(scale)
            p.offset.copy_(offset)
            p.input_min.copy_(lo)
            p.input_max.copy_(hi)
            if constant.any():
                dims = constant.nonzero().flatten().tolist()
                log.info("normalizer %r: constant dims %s mapped to 0", key, dims)
        unfitted = sorted(set(self.dims) - set(data))
        if unfitted:
            log.warning("normalizer keys %s were not fitted and stay identity", unfitted)

    def _check(self, key: str, x: Tensor) -> Tensor:
        if key not in self.dims:
            raise KeyError(f"normalizer has no key {key!r}; keys: {list(self.dims)}")
        if x.ndim == 0 or x.shape[-1] != self.dims[key]:
            raise ValueError(
                f"normalizer key {key!r} expects (..., {self.dims[key]}); got {tuple(x.shape)}"
            )
        return x

    def _affine(self, key: str, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.params[key]
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return p.scale.to(x.device, dtype), p.offset.to(x.device, dtype)

    def normalize_key(self, key: str, x: Tensor) -> Tensor:
        """Normalizes ``x`` of shape ``(..., D)`` with the map of ``key``."""
        x = self._check(key, torch.as_tensor(x))
        scale, offset = self._affine(key, x)
        return x * scale + offset

    def unnormalize_key(self, key: str, x: Tensor) -> Tensor:
        """Inverts :meth:`normalize_key` on ``x`` of shape ``(..., D)``."""
        x = self._check(key, torch.as_tensor(x))
        scale, offset = self._affine(key, x)
        return (x - offset) / scale

    def normalize(self, data: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Normalizes every entry of ``{key: (..., D)}``."""
        return {k: self.normalize_key(k, v) for k, v in data.items()}

    def unnormalize(self, data: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Unnormalizes every entry of ``{key: (..., D)}``."""
        return {k: self.unnormalize_key(k, v) for k, v in data.items()}

    def stats(self) -> dict[str, dict[str, Tensor]]:
        """``{key: {"scale", "offset", "input_min", "input_max"}}``, each ``(D,)`` (copies)."""
        return {
            k: {name: buf.detach().clone() for name, buf in p.named_buffers()}
            for k, p in self.params.items()
        }

    def extra_repr(self) -> str:
        return f"dims={self.dims}"
