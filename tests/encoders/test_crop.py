"""Random crops in training (independent per image), the center crop in evaluation."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.encoders.crop import Crop, center_crop, random_crop


def _coords(n: int, size: int = 12) -> torch.Tensor:
    """(N, size, size, 2) int images whose pixels hold their own (row, col)."""
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([r, c], dim=-1).expand(n, size, size, 2).to(torch.uint8)


def test_random_crops_are_windows_placed_per_image():
    torch.manual_seed(0)
    images = _coords(64)
    out = random_crop(images, (5, 7))
    assert out.shape == (64, 5, 7, 2) and out.dtype == torch.uint8
    top, left = out[:, 0, 0, 0].long(), out[:, 0, 0, 1].long()  # (N,) each crop's offset
    for i in range(64):  # each crop is a contiguous window of its image
        torch.testing.assert_close(out[i], images[i, top[i] : top[i] + 5, left[i] : left[i] + 7])
    assert top.min() >= 0 and top.max() <= 7 and left.min() >= 0 and left.max() <= 5
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 10  # not one shared offset
    assert {0, 7} <= set(top.tolist())  # both extremes are reachable


def test_crop_module_random_in_training_fixed_in_eval():
    images = _coords(8, size=96)
    crop = Crop((84, 84))
    crop.train()
    a, b = crop(images), crop(images)
    assert a.shape == (8, 84, 84, 2) and not torch.equal(a, b)
    crop.eval()
    c, d = crop(images), crop(images)
    torch.testing.assert_close(c, d)
    torch.testing.assert_close(c, images[:, 6:90, 6:90])
    torch.testing.assert_close(center_crop(images, (84, 84)), c)


def test_crop_errors_name_the_sizes():
    with pytest.raises(
        ValueError, match=r"crop size \(13, 5\) does not fit images of size \(12, 12\)"
    ):
        random_crop(_coords(1), (13, 5))
    with pytest.raises(ValueError, match="two positive ints"):
        Crop([84])
