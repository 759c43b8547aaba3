"""Observation encoder for low-dimensional (vector) observations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_policy.data.keys import LOW_DIM


class LowDimEncoder(nn.Module):
    """Concatenates the low-dim observation keys of a shape description, frame by frame.

    Args:
        shape_meta: The dataset's shape description:
            ``{"obs": {key: {"shape": [...], "type": "low_dim"}}, "action": {"shape": [Da]}}``.
        keys: Observation keys to use, in this order; all low-dim keys of ``shape_meta`` if None.
    """

    def __init__(self, shape_meta: Mapping[str, Any], keys: list[str] | None = None) -> None:
        super().__init__()
        obs_meta = shape_meta["obs"]
        if keys is None:
            keys = [k for k, m in obs_meta.items() if m.get("type", LOW_DIM) == LOW_DIM]
        for k in keys:
            if k not in obs_meta:
                raise KeyError(f"encoder key {k!r} is not among the obs keys {list(obs_meta)}")
            if obs_meta[k].get("type", LOW_DIM) != LOW_DIM:
                raise ValueError(f"LowDimEncoder cannot encode {k!r} of type {obs_meta[k]['type']}")
        if not keys:
            raise ValueError("LowDimEncoder needs at least one low-dim observation key")
        self.keys = list(keys)
        self.dims = {k: math.prod(obs_meta[k]["shape"]) for k in self.keys}
        self.output_dim = sum(self.dims.values())

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Maps normalized observations {key: (B, To, ...)} to features (B, To, output_dim)."""
        feats = [obs[k].flatten(2) for k in self.keys]  # each (B, To, D_k)
        return torch.cat(feats, dim=-1)
