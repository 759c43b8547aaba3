"""Named geometric features a low-dim encoder can add to every frame.

A config selects a feature by its name in :data:`FEATURES`, never by an import path, so the
config stored in a checkpoint chooses among the functions listed here and runs nothing else.
A feature reads its key's frame as observed (raw units, not normalized).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# BlockPush's observation frame (16 values): per block x, y, yaw; the effector's x, y and its
# commanded target; per zone x, y, yaw.
_BLOCKS = [[0, 1], [3, 4]]
_EFFECTOR = [6, 7]
_ZONES = [[10, 11], [13, 14]]


@dataclass(frozen=True)
class Feature:
    """A function of one key's raw frame.

    Attributes:
        dims: Size of the frame it reads (its flat length).
        width: Number of values it returns per frame.
        fn: ``(B, To, dims) -> (B, To, width)``.
    """

    dims: int
    width: int
    fn: Callable[[torch.Tensor], torch.Tensor]


def blockpush_push_lines(frame: torch.Tensor) -> torch.Tensor:
    """The pusher on each block-to-zone line: what the oracle re-aims by on every step.

    For each block and each zone: the effector's offset from the block along the unit
    direction from the block to the zone (negative = behind the block, where a push starts)
    and across it (signed), and the block's distance to the zone. The values do not change
    when the whole scene turns or shifts on the table.

    Args:
        frame: BlockPush observations (B, To, 16), raw (metres).

    Returns:
        (B, To, 12): along (block 0 to zones 0, 1; block 1 to zones 0, 1), across (same
        order), distances (same order).
    """
    blocks = frame[..., _BLOCKS]  # (B, To, 2, 2)
    zones = frame[..., _ZONES]  # (B, To, 2, 2)
    effector = frame[..., _EFFECTOR]  # (B, To, 2)
    line = zones.unsqueeze(-3) - blocks.unsqueeze(-2)  # (B, To, block, zone, 2)
    dist = line.norm(dim=-1)  # (B, To, 2, 2)
    u = line / dist.clamp_min(1e-6).unsqueeze(-1)  # unit block -> zone
    rel = (effector.unsqueeze(-2) - blocks).unsqueeze(-2)  # (B, To, block, 1, 2)
    along = (rel * u).sum(-1)  # (B, To, 2, 2)
    across = rel[..., 0] * u[..., 1] - rel[..., 1] * u[..., 0]  # (B, To, 2, 2)
    return torch.cat([along.flatten(-2), across.flatten(-2), dist.flatten(-2)], dim=-1)


FEATURES: dict[str, Feature] = {
    "blockpush_push_lines": Feature(dims=16, width=12, fn=blockpush_push_lines),
}
