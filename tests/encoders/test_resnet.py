"""ResNet-18 (GroupNorm) trunk, spatial softmax and the per-camera keypoint encoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_policy.encoders.resnet import (
    ResNet18,
    ResNetKeypointEncoder,
    SpatialSoftmax,
    load_torchvision_weights,
)


def test_resnet18_is_resnet18_with_groupnorm():
    net = ResNet18()
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in the classifier; the
    # GroupNorms have the BatchNorms' affine parameters.
    assert sum(p.numel() for p in net.parameters()) == 11_176_512
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(m.num_groups == m.num_channels // 16 for m in norms)
    assert net.out_channels == 512


def test_trunk_feature_map_for_84x84_crops():
    net = ResNet18(width=8)  # stages of 8, 16, 32, 64 channels; GroupNorm falls back to 1 group
    out = net(torch.randn(2, 3, 84, 84))
    assert out.shape == (2, 64, 3, 3)  # 84 -> 42 -> 21 -> 21 -> 11 -> 6 -> 3


@pytest.mark.parametrize(("stages", "side"), [(1, 21), (2, 11), (3, 6), (4, 3)])
def test_fewer_stages_give_a_finer_map(stages, side):
    net = ResNet18(width=8, stages=stages)
    out = net(torch.randn(2, 3, 84, 84))
    assert out.shape == (2, 8 * 2 ** (stages - 1), side, side)
    assert net.out_channels == out.shape[1]
    assert not any(name.startswith(f"layer{stages + 1}") for name, _ in net.named_parameters())


def test_stages_outside_resnet18_are_refused():
    with pytest.raises(ValueError, match="stages=5"):
        ResNet18(width=8, stages=5)


def test_spatial_softmax_finds_the_peak():
    pool = SpatialSoftmax(in_channels=2, num_keypoints=2)
    with torch.no_grad():  # keypoint maps = input channels
        pool.keypoint_conv.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        pool.keypoint_conv.bias.zero_()
    x = torch.full((1, 2, 3, 5), -1e4)
    x[0, 0, 0, 4] = 0.0  # top right
    x[0, 1, 2, 0] = 0.0  # bottom left
    out = pool(x)
    assert out.shape == (1, 4)
    torch.testing.assert_close(out, torch.tensor([[1.0, -1.0, -1.0, 1.0]]))  # x0, y0, x1, y1


def test_keypoint_encoder_output():
    enc = ResNetKeypointEncoder(in_channels=3, width=8, num_keypoints=4, feature_dim=10)
    assert enc.output_dim == 10
    out = enc(torch.rand(5, 3, 84, 84) * 2 - 1)
    assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_loads_torchvision_format_weights(tmp_path):
    src = ResNet18(width=8)
    state = dict(src.state_dict())
    state["bn1.running_mean"] = torch.zeros(8)  # BatchNorm statistics and classifier: dropped
    state["fc.weight"] = torch.zeros(1000, 64)
    torch.save(state, tmp_path / "r18.pth")
    enc = ResNetKeypointEncoder(width=8, weights=str(tmp_path / "r18.pth"))
    two_stages = ResNetKeypointEncoder(width=8, weights=str(tmp_path / "r18.pth"), stages=2)
    torch.testing.assert_close(two_stages.trunk.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    torch.testing.assert_close(enc.trunk.state_dict(), src.state_dict())

    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lack 1 trunk tensors"):
        load_torchvision_weights(ResNet18(width=8), tmp_path / "partial.pth")
