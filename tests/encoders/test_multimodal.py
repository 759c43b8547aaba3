"""ObsEncoder: cameras and low-dim keys from a shape description, own or shared backbones."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from diffusion_policy.encoders.multimodal import ObsEncoder
from diffusion_policy.encoders.resnet import ResNetKeypointEncoder

TINY = partial(ResNetKeypointEncoder, width=8, num_keypoints=4, feature_dim=6)


def _meta(*cameras: str, size: int = 96) -> dict:
    obs = {k: {"shape": [size, size, 3], "type": "rgb"} for k in cameras}
    obs["agent_pos"] = {"shape": [2], "type": "low_dim"}
    return {"obs": obs, "action": {"shape": [2]}}


def _obs(meta: dict, B: int = 2, To: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, m in meta["obs"].items():
        shape = (B, To, *m["shape"])
        if m["type"] == "rgb":
            out[k] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


def test_one_camera_output_shape():
    meta = _meta("image")
    enc = ObsEncoder(meta, backbone=TINY, crop_size=(84, 84))
    assert enc.output_dim == 6 + 2
    feats = enc(_obs(meta, B=3, To=2))
    assert feats.shape == (3, 2, 8) and feats.dtype == torch.float32
    assert list(enc.backbones) == ["image"]


def test_paper_encoder_gives_66_features_per_frame():
    meta = _meta("image")
    enc = ObsEncoder(meta, backbone=ResNetKeypointEncoder, crop_size=(84, 84))
    assert enc.output_dim == 64 + 2  # 32 keypoints x (x, y) -> linear 64, + agent x, y


def test_second_camera_is_a_shape_meta_entry():
    meta = _meta("front", "wrist")
    own = ObsEncoder(meta, backbone=TINY)
    shared = ObsEncoder(meta, backbone=TINY, share_backbone=True)
    assert own.output_dim == shared.output_dim == 6 + 6 + 2
    assert list(own.backbones) == ["front", "wrist"] and list(shared.backbones) == ["shared"]
    n_own = sum(p.numel() for p in own.parameters())
    assert n_own == 2 * sum(p.numel() for p in shared.parameters())
    obs = _obs(meta, B=2, To=3)
    assert own(obs).shape == shared(obs).shape == (2, 3, 14)

    # Shared: one batched pass equals each camera through the same backbone.
    shared.eval()
    out = shared(obs)
    alone = ObsEncoder({"obs": {"wrist": meta["obs"]["wrist"]}}, backbone=TINY).eval()
    alone.backbones["wrist"].load_state_dict(shared.backbones["shared"].state_dict())
    torch.testing.assert_close(out[..., 6:12], alone({"wrist": obs["wrist"]}))
    torch.testing.assert_close(out[..., 12:], obs["agent_pos"])  # low-dim passed through


def test_uint8_and_float_pixels_agree_and_eval_is_deterministic():
    meta = _meta("image")
    enc = ObsEncoder(meta, backbone=TINY).eval()
    obs = _obs(meta)
    a = enc(obs)
    b = enc({**obs, "image": obs["image"].float()})
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, enc(obs))
    enc.train()
    assert not torch.allclose(enc(obs), enc(obs))  # random crops


def test_pixels_map_to_minus_one_one():
    meta = _meta("image", size=4)
    enc = ObsEncoder(meta, backbone=TINY, crop_size=None)
    img = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(48).reshape(1, 2, 4, 4, 3)
    x = enc._prepare("image", img)  # (N, C, h, w)
    assert x.shape == (2, 3, 4, 4)
    assert x[0].eq(-1).all() and x[1].eq(1).all()
    as_float = img.float()
    enc._prepare("image", as_float)
    torch.testing.assert_close(as_float, img.float())  # the caller's frames are not modified


def test_errors_name_the_offending_values():
    meta = _meta("image")
    with pytest.raises(ValueError, match=r"crop_size=\[100, 84\] does not fit 'image'"):
        ObsEncoder(meta, backbone=TINY, crop_size=(100, 84))
    with pytest.raises(KeyError, match="'depth' is not among the obs keys"):
        ObsEncoder(meta, backbone=TINY, keys=["depth"])
    bad = {"obs": {"image": {"shape": [96, 96, 3], "type": "pointcloud"}}}
    with pytest.raises(ValueError, match="type 'pointcloud'"):
        ObsEncoder(bad, backbone=TINY)
    mixed = _meta("a")
    mixed["obs"]["b"] = {"shape": [64, 64, 3], "type": "rgb"}
    with pytest.raises(ValueError, match="share_backbone=true needs cameras of one cropped shape"):
        ObsEncoder(
            mixed, backbone=TINY, crop_size={"a": (60, 60), "b": (50, 50)}, share_backbone=True
        )
    enc = ObsEncoder(meta, backbone=TINY)
    chw = {
        "image": torch.zeros(1, 2, 3, 96, 96, dtype=torch.uint8),
        "agent_pos": torch.zeros(1, 2, 2),
    }
    with pytest.raises(ValueError, match=r"frames of shape \(3, 96, 96\), expected \(96, 96, 3\)"):
        enc(chw)
