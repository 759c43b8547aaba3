"""Observation encoder for low-dimensional (vector) observations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_policy.data.keys import LOW_DIM, raw_key
from diffusion_policy.encoders.features import FEATURES


class LowDimEncoder(nn.Module):
    """Concatenates the low-dim observation keys of a shape description, frame by frame.

    By default the features are the normalized observations themselves. With ``hidden_dims``
    an MLP (Linear + Mish layers, trained with the policy) maps each frame's concatenation to
    features: a task whose actions depend on geometry between objects (where to stand behind a
    block to push it to a zone) gets it computed once per frame instead of by the denoiser.

    Args:
        shape_meta: The dataset's shape description:
            ``{"obs": {key: {"shape": [...], "type": "low_dim"}}, "action": {"shape": [Da]}}``.
        keys: Observation keys to use, in this order; all low-dim keys of ``shape_meta`` if None.
        hidden_dims: Widths of the MLP's layers (the last is the feature size); None or empty
            for no MLP.
        exclude: ``{key: [flat indices]}``, values of a key's frame the policy does not see
            (e.g. BlockPush's commanded target, ``{obs: [8, 9]}``: with one frame the policy
            then sees no trace of its own motion).
        angles: ``{key: {flat index: m}}``, values that are angles (radians) of objects that
            look the same every ``2 pi / m``: each becomes ``cos(m a), sin(m a)`` of the raw
            angle, so poses that look alike get alike features across the wrap at +-pi and
            the symmetry (BlockPush's cubes: ``{obs: {2: 4, 5: 4}}``).
        features: ``{key: [name, ...]}``, geometric features of a key's frame appended to
            it, by their names in :data:`~diffusion_policy.encoders.features.FEATURES`
            (BlockPush's pusher on each block-to-zone line: ``{obs: [blockpush_push_lines]}``).

    Angles and features read a key's frame as observed: the policy hands the encoder the
    raw frame of every key in ``raw_obs`` under ``raw_key(key)``, beside the normalized one.
    """

    def __init__(
        self,
        shape_meta: Mapping[str, Any],
        keys: list[str] | None = None,
        hidden_dims: list[int] | None = None,
        exclude: Mapping[str, list[int]] | None = None,
        angles: Mapping[str, Mapping[int, int]] | None = None,
        features: Mapping[str, list[str]] | None = None,
    ) -> None:
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
        self.keep: dict[str, list[int]] = {}
        for k, drop in self._per_key("exclude", exclude):
            dropped = {int(i) for i in drop}
            self.keep[k] = [i for i in range(self.dims[k]) if i not in dropped]
            if not dropped <= set(range(self.dims[k])) or not self.keep[k]:
                raise ValueError(
                    f"exclude {k!r}: {list(drop)} must be indices in [0, {self.dims[k]}) "
                    "that leave at least one value"
                )
        self.angles: dict[str, dict[int, int]] = {}
        for k, folds in self._per_key("angles", angles):
            self.angles[k] = {int(i): int(m) for i, m in folds.items()}
            kept = self.keep.get(k, list(range(self.dims[k])))
            if not set(self.angles[k]) <= set(kept) or any(m < 1 for m in self.angles[k].values()):
                raise ValueError(
                    f"angles {k!r}: {dict(folds)} must map kept indices in [0, {self.dims[k]}) "
                    "to symmetries m >= 1"
                )
            self.keep[k] = [i for i in kept if i not in self.angles[k]]
        self.features: dict[str, list[str]] = {}
        for k, names in self._per_key("features", features):
            for name in names:
                if name not in FEATURES:
                    raise ValueError(f"features {k!r}: {name!r} is not one of {sorted(FEATURES)}")
                if FEATURES[name].dims != self.dims[k]:
                    raise ValueError(
                        f"features {k!r}: {name!r} reads {FEATURES[name].dims} values per "
                        f"frame, the key has {self.dims[k]}"
                    )
            self.features[k] = list(names)
        # Keys whose raw (un-normalized) frames the policy passes beside the normalized ones.
        self.raw_obs = sorted(k for k in self.keys if self.angles.get(k) or self.features.get(k))
        width = sum(len(self.keep.get(k, range(d))) for k, d in self.dims.items())
        width += 2 * sum(len(folds) for folds in self.angles.values())
        width += sum(FEATURES[n].width for names in self.features.values() for n in names)
        layers: list[nn.Module] = []
        for hidden in hidden_dims or []:
            if hidden < 1:
                raise ValueError(f"hidden_dims={list(hidden_dims)} must be positive widths")
            layers += [nn.Linear(width, hidden), nn.Mish()]
            width = hidden
        self.mlp = nn.Sequential(*layers) if layers else None
        self.output_dim = width

    def _per_key(self, option: str, values: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
        """The items of a per-key option, each key checked to be one of the encoder's."""
        items = list((values or {}).items())
        for k, _ in items:
            if k not in self.dims:
                raise KeyError(f"{option} key {k!r} is not among the encoder keys {self.keys}")
        return items

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Maps observations to features (B, To, output_dim).

        Args:
            obs: Normalized observations ``{key: (B, To, ...)}``, and for each key of
                ``raw_obs`` its frames as observed, ``{raw_key(key): (B, To, D_k)}``.
        """
        parts, extra = [], []
        for k in self.keys:
            p = obs[k].flatten(2)  # (B, To, D_k)
            parts.append(p[..., self.keep[k]] if k in self.keep else p)
            if k not in self.raw_obs:
                continue
            raw = obs[raw_key(k)]  # (B, To, D_k), as observed
            for i, m in self.angles.get(k, {}).items():
                turn = m * raw[..., i : i + 1]  # (B, To, 1)
                extra += [torch.cos(turn), torch.sin(turn)]
            extra += [FEATURES[name].fn(raw) for name in self.features.get(k, [])]
        feats = torch.cat(parts + extra, dim=-1)  # (B, To, output_dim before the MLP)
        return feats if self.mlp is None else self.mlp(feats)
