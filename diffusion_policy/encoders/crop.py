"""Image crops in plain torch: a random crop per image in training, the center crop in evaluation.

Images are channels-last, ``(N, H, W, C)`` (the dataset's and the env's layout), of any dtype;
cropping uint8 before the float conversion moves a quarter of the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _check(images: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {tuple(images.shape)}")
    H, W = images.shape[1:3]
    h, w = size
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"crop size {(h, w)} does not fit images of size {(H, W)}")
    return H, W


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central ``size`` window of each image: (N, H, W, C) -> (N, h, w, C), a view."""
    H, W = _check(images, size)
    top, left = (H - size[0]) // 2, (W - size[1]) // 2
    return images[:, top : top + size[0], left : left + size[1]]


def random_crop(
    images: torch.Tensor, size: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """An independent uniformly placed ``size`` window per image, by one gather.

    Args:
        images: (N, H, W, C).
        size: (h, w) of the crop.
        generator: Random generator (on the images' device); torch's global one if None.

    Returns:
        (N, h, w, C), a new tensor.
    """
    H, W = _check(images, size)
    n, (h, w), dev = images.shape[0], size, images.device
    top = torch.randint(0, H - h + 1, (n,), device=dev, generator=generator)  # (N,)
    left = torch.randint(0, W - w + 1, (n,), device=dev, generator=generator)  # (N,)
    rows = top[:, None] + torch.arange(h, device=dev)  # (N, h)
    cols = left[:, None] + torch.arange(w, device=dev)  # (N, w)
    batch = torch.arange(n, device=dev)[:, None, None]  # (N, 1, 1)
    return images[batch, rows[:, :, None], cols[:, None, :]]  # (N, h, w, C)


class Crop(nn.Module):
    """Random crops in training mode, the center crop in evaluation mode (as the paper).

    Args:
        size: (h, w) of the crop.
    """

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"crop size={list(size)} must be two positive ints (h, w)")
        self.size = (int(size[0]), int(size[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, h, w, C)."""
        if self.training:
            return random_crop(images, self.size)
        return center_crop(images, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"
