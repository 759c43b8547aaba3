"""ResNet-18 image backbone in plain torch, with GroupNorm and a spatial-softmax keypoint head.

The paper's vision encoder (Chi et al. 2023, after robomimic's ``VisualCore``): a ResNet-18 trunk
trained from scratch, every BatchNorm replaced by GroupNorm (channels / 16 groups: BatchNorm's
running statistics interact badly with the EMA of the weights), and the global average pool +
classifier replaced by a spatial softmax over 32 learned keypoints followed by a linear layer to
64 features. For an 84x84 crop the trunk gives 512 x 3 x 3 features; 32 keypoints x (x, y) = 64
values, projected linearly to 64.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def group_norm(channels: int, group_size: int = 16) -> nn.GroupNorm:
    """GroupNorm with ``channels // group_size`` groups (at least 1), as the paper's encoder."""
    return nn.GroupNorm(max(1, channels // group_size), channels)


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a residual connection (torchvision's names)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, group_size: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = group_norm(out_ch, group_size)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = group_norm(out_ch, group_size)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                group_norm(out_ch, group_size),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class ResNet18(nn.Module):
    """ResNet-18's convolutional trunk (no pool, no classifier), GroupNorm instead of BatchNorm.

    Parameter names follow torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ...; the ``bn*`` modules are GroupNorms), so its conv and affine weights can be loaded.

    Args:
        in_channels: Input channels (3 for RGB).
        width: Channels of the first stage; the stages have width x (1, 2, 4, 8). 64 is
            ResNet-18; smaller values give a cheap network for tests.
        group_size: Channels per GroupNorm group.
        stages: How many of the 4 residual stages to keep; each halves the feature map, so an
            84x84 crop ends at 21, 11, 6 or 3 positions a side (a finer map for the keypoints).
    """

    def __init__(
        self, in_channels: int = 3, width: int = 64, group_size: int = 16, stages: int = 4
    ) -> None:
        super().__init__()
        if width < 1 or group_size < 1:
            raise ValueError(f"width={width} and group_size={group_size} must be >= 1")
        if stages not in (1, 2, 3, 4):
            raise ValueError(f"stages={stages} must be 1, 2, 3 or 4 (ResNet-18 has 4)")
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = group_norm(width, group_size)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        chans = [width, 2 * width, 4 * width, 8 * width][:stages]
        in_ch = width
        for i, ch in enumerate(chans):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch, ch, stride, group_size), BasicBlock(ch, ch, 1, group_size)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = ch
        self.out_channels = in_ch
        self.num_stages = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's initialization
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 8 * width, ceil(H / 32), ceil(W / 32)) with 4 stages; each stage
        fewer doubles the side and halves the channels."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))  # (N, w, H/4, W/4)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class SpatialSoftmax(nn.Module):
    """Keypoints as the expected (x, y) of a softmax over each feature map (Levine et al. 2016).

    A 1x1 convolution makes ``num_keypoints`` maps from the input channels; each map's softmax
    over positions weights a grid of coordinates in [-1, 1].

    Args:
        in_channels: Channels of the input feature map.
        num_keypoints: Keypoints K (32 in the paper's encoder).
        temperature: Softmax temperature.
    """

    def __init__(self, in_channels: int, num_keypoints: int = 32, temperature: float = 1.0):
        super().__init__()
        if num_keypoints < 1 or temperature <= 0:
            raise ValueError(
                f"num_keypoints={num_keypoints} must be >= 1 and temperature={temperature} > 0"
            )
        self.keypoint_conv = nn.Conv2d(in_channels, num_keypoints, 1)
        self.num_keypoints = num_keypoints
        self.temperature = temperature
        self.output_dim = 2 * num_keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, 2K): x0, y0, x1, y1, ..."""
        maps = self.keypoint_conv(x)  # (N, K, h, w)
        n, k, h, w = maps.shape
        attn = torch.softmax(maps.flatten(2).float() / self.temperature, dim=-1)  # (N, K, h*w)
        ys, xs = _unit_grid(h, x.device), _unit_grid(w, x.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        keypoints = attn @ grid.reshape(h * w, 2)  # (N, K, 2)
        return keypoints.reshape(n, 2 * k).to(x.dtype)


def _unit_grid(n: int, device: torch.device) -> torch.Tensor:
    """``torch.linspace(-1, 1, n)`` (n = 1: [-1]), written so that an ONNX export of a 1-pixel
    map does not divide by n - 1 = 0."""
    return torch.arange(n, device=device, dtype=torch.float32) * (2.0 / max(n - 1, 1)) - 1.0


class ResNetKeypointEncoder(nn.Module):
    """One camera's encoder: ResNet-18 trunk -> spatial softmax -> linear, (N, C, H, W) -> (N, F).

    Args:
        in_channels: Image channels.
        width: First-stage width of the trunk (64 = ResNet-18).
        group_size: Channels per GroupNorm group.
        num_keypoints: Spatial-softmax keypoints.
        feature_dim: Output features F (a linear layer from 2 x num_keypoints).
        weights: Optional path to a torchvision-format ``resnet18`` state dict (e.g. ImageNet
            weights) for the trunk; BatchNorm running statistics and the classifier are dropped,
            BatchNorm's affine weights go to the GroupNorms. None (default): trained from scratch.
        stages: Residual stages of the trunk kept (4 = ResNet-18; see :class:`ResNet18`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        group_size: int = 16,
        num_keypoints: int = 32,
        feature_dim: int = 64,
        weights: str | None = None,
        stages: int = 4,
    ) -> None:
        super().__init__()
        self.trunk = ResNet18(in_channels, width=width, group_size=group_size, stages=stages)
        if weights is not None:
            load_torchvision_weights(self.trunk, weights)
        self.pool = SpatialSoftmax(self.trunk.out_channels, num_keypoints)
        self.proj = nn.Linear(self.pool.output_dim, feature_dim)
        self.output_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, feature_dim)."""
        return self.proj(self.pool(self.trunk(x)))


def load_torchvision_weights(trunk: ResNet18, path: str | Path) -> None:
    """Loads a torchvision ``resnet18`` state dict into ``trunk`` (see ResNetKeypointEncoder)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = trunk.state_dict()
    kept = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(kept))
    if missing:
        raise ValueError(f"weights {path} lack {len(missing)} trunk tensors, e.g. {missing[:3]}")
    trunk.load_state_dict(kept)
    log.info("loaded ResNet-18 trunk weights from %s", path)
