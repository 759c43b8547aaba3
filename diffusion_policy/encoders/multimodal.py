"""Observation encoder for any mix of camera images and low-dimensional observations."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusion_policy.data.keys import LOW_DIM, RGB
from diffusion_policy.encoders.crop import Crop

SHARED = "shared"


class ObsEncoder(nn.Module):
    """Encodes each observation key and concatenates the features, frame by frame.

    Built from the dataset's shape description: every ``"rgb"`` key (a camera) is cropped, mapped
    from [0, 255] to [-1, 1] and encoded by a backbone (its own, or one shared by all cameras);
    every ``"low_dim"`` key (already normalized by the policy) is flattened. A second camera is a
    new key in the dataset's shape description, not new code.

    Images are channels-last ``(H, W, C)`` as the dataset and the env store them, uint8 (or
    float holding 0..255); they become float only here, after cropping.

    Args:
        shape_meta: ``{"obs": {key: {"shape": [...], "type": "rgb" | "low_dim"}}, ...}``.
        backbone: Factory ``backbone(in_channels=C)`` of a module mapping (N, C, h, w) images in
            [-1, 1] to (N, F) and exposing ``output_dim`` = F, e.g. a ``functools.partial`` of
            :class:`~diffusion_policy.encoders.resnet.ResNetKeypointEncoder` made by Hydra.
        crop_size: (h, w) of the training random crop / evaluation center crop, for every camera,
            or ``{key: (h, w)}`` per camera (a camera missing from it, or None: no crop).
        share_backbone: One backbone for all cameras (they need equal channels and crop sizes);
            otherwise one per camera.
        keys: Observation keys to use, in the order their features are concatenated; all keys
            of ``shape_meta`` if None.

    Attributes:
        output_dim: Features per frame F.
    """

    def __init__(
        self,
        shape_meta: Mapping[str, Any],
        backbone: Callable[..., nn.Module],
        crop_size: Sequence[int] | Mapping[str, Sequence[int]] | None = (84, 84),
        share_backbone: bool = False,
        keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        obs_meta = shape_meta["obs"]
        keys = list(obs_meta) if keys is None else list(keys)
        if not keys:
            raise ValueError("ObsEncoder needs at least one observation key")
        self.keys = keys
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.rgb_keys: list[str] = []
        for k in keys:
            if k not in obs_meta:
                raise KeyError(f"encoder key {k!r} is not among the obs keys {list(obs_meta)}")
            kind = obs_meta[k].get("type", LOW_DIM)
            self.shapes[k] = tuple(int(s) for s in obs_meta[k]["shape"])
            if kind == RGB:
                if len(self.shapes[k]) != 3:
                    raise ValueError(f"rgb key {k!r} needs shape (H, W, C), got {self.shapes[k]}")
                self.rgb_keys.append(k)
            elif kind != LOW_DIM:
                raise ValueError(f"obs key {k!r} has type {kind!r}, not {RGB!r} or {LOW_DIM!r}")

        self.crops = nn.ModuleDict()
        for k in self.rgb_keys:
            size = crop_size.get(k) if isinstance(crop_size, Mapping) else crop_size
            H, W, _ = self.shapes[k]
            if size is not None:
                if not (len(size) == 2 and 1 <= size[0] <= H and 1 <= size[1] <= W):
                    raise ValueError(f"crop_size={list(size)} does not fit {k!r} of size {(H, W)}")
                self.crops[k] = Crop(size)

        self.share_backbone = share_backbone and bool(self.rgb_keys)
        self.backbones = nn.ModuleDict()
        if self.share_backbone:
            in_shapes = {k: (*self._crop_hw(k), self.shapes[k][2]) for k in self.rgb_keys}
            if len(set(in_shapes.values())) > 1:
                raise ValueError(
                    f"share_backbone=true needs cameras of one cropped shape (h, w, C); "
                    f"got {in_shapes}"
                )
            self.backbones[SHARED] = backbone(in_channels=self.shapes[self.rgb_keys[0]][2])
        else:
            for k in self.rgb_keys:
                self.backbones[k] = backbone(in_channels=self.shapes[k][2])

        self.dims = {
            k: self._backbone(k).output_dim if k in self.rgb_keys else math.prod(self.shapes[k])
            for k in keys
        }
        self.output_dim = sum(self.dims.values())

    def _crop_hw(self, key: str) -> tuple[int, int]:
        return self.crops[key].size if key in self.crops else self.shapes[key][:2]

    def _backbone(self, key: str) -> nn.Module:
        return self.backbones[SHARED if self.share_backbone else key]

    def _prepare(self, key: str, images: torch.Tensor) -> torch.Tensor:
        """(B, To, H, W, C) uint8 / 0..255 -> (B * To, C, h, w) float in [-1, 1]."""
        if tuple(images.shape[2:]) != self.shapes[key]:
            raise ValueError(
                f"obs {key!r} has frames of shape {tuple(images.shape[2:])}, expected "
                f"{self.shapes[key]} (H, W, C)"
            )
        x = images.flatten(0, 1)  # (N, H, W, C)
        if key in self.crops:
            x = self.crops[key](x)  # (N, h, w, C)
        # (N, C, h, w) kept channels-last in memory, the frames' own layout: no transpose copy,
        # and CPU convolutions run faster on it. A copy, so the caller's frames stay untouched.
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.channels_last, copy=True)
        return x.mul_(2.0 / 255.0).sub_(1.0)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Maps observations {key: (B, To, ...)} to features (B, To, output_dim)."""
        B, To = obs[self.keys[0]].shape[:2]
        feats: dict[str, torch.Tensor] = {}
        if self.share_backbone:
            # All cameras through the shared backbone in one batch.
            images = torch.cat([self._prepare(k, obs[k]) for k in self.rgb_keys])  # (K*N, C, h, w)
            out = self.backbones[SHARED](images).reshape(len(self.rgb_keys), B, To, -1)
            feats.update(zip(self.rgb_keys, out, strict=True))
        else:
            for k in self.rgb_keys:
                feats[k] = self.backbones[k](self._prepare(k, obs[k])).reshape(B, To, -1)
        for k in self.keys:
            if k not in feats:
                feats[k] = obs[k].reshape(B, To, -1).float()  # (B, To, D_k)
        return torch.cat([feats[k] for k in self.keys], dim=-1)  # (B, To, F)
