"""The low-dim encoder: concatenated observations, or an MLP over them trained with the policy."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.data.keys import raw_key
from diffusion_policy.encoders.features import FEATURES
from diffusion_policy.encoders.lowdim import LowDimEncoder
from diffusion_policy.training.optim import split_decay

META = {
    "obs": {"a": {"shape": [3], "type": "low_dim"}, "b": {"shape": [2, 2], "type": "low_dim"}},
    "action": {"shape": [2]},
}


def _obs():
    return {"a": torch.randn(4, 2, 3), "b": torch.randn(4, 2, 2, 2)}


def test_without_mlp_the_features_are_the_observations():
    encoder = LowDimEncoder(META)
    obs = _obs()
    out = encoder(obs)  # (B, To, 3 + 4)
    assert encoder.output_dim == 7 and out.shape == (4, 2, 7)
    torch.testing.assert_close(out, torch.cat([obs["a"], obs["b"].flatten(2)], -1))
    assert not list(encoder.parameters())


def test_mlp_maps_each_frame_and_is_trained():
    torch.manual_seed(0)
    encoder = LowDimEncoder(META, hidden_dims=[16, 8])
    obs = _obs()
    out = encoder(obs)
    assert encoder.output_dim == 8 and out.shape == (4, 2, 8)
    # Frames are encoded alone: changing frame 0 leaves frame 1's features as they were.
    changed = {k: v.clone() for k, v in obs.items()}
    changed["a"][:, 0] += 1.0
    torch.testing.assert_close(encoder(changed)[:, 1], out[:, 1])
    assert not torch.allclose(encoder(changed)[:, 0], out[:, 0])
    decay, no_decay = split_decay(encoder)
    assert len(decay) == 2 and len(no_decay) == 2  # the weights decay, the biases do not


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="hidden_dims"):
        LowDimEncoder(META, hidden_dims=[0])


def test_excluded_values_are_not_seen():
    encoder = LowDimEncoder(META, exclude={"b": [0, 3]})
    obs = _obs()
    out = encoder(obs)  # (B, To, 3 + 2)
    assert encoder.output_dim == 5 and out.shape == (4, 2, 5)
    torch.testing.assert_close(out[..., 3:], obs["b"].flatten(2)[..., [1, 2]])
    changed = {k: v.clone() for k, v in obs.items()}
    changed["b"][..., 0, 0] += 1.0  # flat index 0: excluded
    torch.testing.assert_close(encoder(changed), out)


@pytest.mark.parametrize(
    ("exclude", "error"),
    [({"c": [0]}, KeyError), ({"b": [4]}, ValueError), ({"a": [0, 1, 2]}, ValueError)],
)
def test_bad_exclusions_are_refused(exclude, error):
    with pytest.raises(error, match="exclude"):
        LowDimEncoder(META, exclude=exclude)


def test_angles_become_cos_and_sin_of_their_symmetry():
    encoder = LowDimEncoder(META, angles={"a": {1: 4}}, exclude={"b": [3]})
    assert encoder.raw_obs == ["a"]
    obs = _obs()
    obs[raw_key("a")] = torch.randn(4, 2, 3)  # the frames as observed, beside the normalized
    out = encoder(obs)  # (B, To, 2 + 3 + 2): a without its angle, b's kept values, cos, sin
    assert encoder.output_dim == 7 and out.shape == (4, 2, 7)
    torch.testing.assert_close(out[..., :2], obs["a"][..., [0, 2]])
    torch.testing.assert_close(out[..., 2:5], obs["b"].flatten(2)[..., :3])
    angle = obs[raw_key("a")][..., 1]
    torch.testing.assert_close(out[..., 5], torch.cos(4 * angle))
    torch.testing.assert_close(out[..., 6], torch.sin(4 * angle))
    # A quarter turn (and the wrap at +-pi) of a 4-fold symmetric object looks the same.
    turned = {k: v.clone() for k, v in obs.items()}
    turned[raw_key("a")][..., 1] += torch.pi / 2
    torch.testing.assert_close(encoder(turned), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("angles", "exclude", "error"),
    [
        ({"c": {0: 4}}, None, KeyError),
        ({"a": {3: 4}}, None, ValueError),
        ({"a": {0: 0}}, None, ValueError),
        ({"b": {1: 4}}, {"b": [1]}, ValueError),  # an excluded value is not an angle too
    ],
)
def test_bad_angles_are_refused(angles, exclude, error):
    with pytest.raises(error, match="angles"):
        LowDimEncoder(META, angles=angles, exclude=exclude)


BLOCKPUSH_META = {"obs": {"obs": {"shape": [16], "type": "low_dim"}}, "action": {"shape": [2]}}


def _blockpush_frame(block, effector, zone):
    """A (1, 1, 16) frame with block 0, the effector and zone 0 where given (metres)."""
    frame = torch.zeros(1, 1, 16)
    frame[..., [0, 1]] = torch.tensor(block)
    frame[..., [3, 4]] = torch.tensor([0.6, 0.3])
    frame[..., [6, 7]] = torch.tensor(effector)
    frame[..., [10, 11]] = torch.tensor(zone)
    frame[..., [13, 14]] = torch.tensor([0.3, -0.3])
    return frame


def test_push_lines_place_the_pusher_on_each_block_to_zone_line():
    # Block 0 at (0.4, 0), zone 0 straight ahead at (0.4, 0.2); the pusher 5 cm behind the
    # block and 1 cm to the zone-facing line's right: along -0.05, across +0.01, distance 0.2.
    frame = _blockpush_frame(block=[0.4, 0.0], effector=[0.41, -0.05], zone=[0.4, 0.2])
    out = FEATURES["blockpush_push_lines"].fn(frame)  # (1, 1, 12)
    assert out.shape == (1, 1, 12)
    torch.testing.assert_close(out[0, 0, [0, 4, 8]], torch.tensor([-0.05, 0.01, 0.2]))


def test_push_lines_do_not_change_when_the_scene_turns_and_shifts():
    torch.manual_seed(0)
    frame = torch.rand(5, 2, 16)
    out = FEATURES["blockpush_push_lines"].fn(frame)
    turn = torch.tensor(0.7)
    rot = torch.stack(
        [torch.stack([turn.cos(), -turn.sin()]), torch.stack([turn.sin(), turn.cos()])]
    )
    moved = frame.clone()
    for x in (0, 3, 6, 8, 10, 13):  # every (x, y) pair
        moved[..., x : x + 2] = frame[..., x : x + 2] @ rot.T + torch.tensor([0.1, -0.2])
    torch.testing.assert_close(FEATURES["blockpush_push_lines"].fn(moved), out)


def test_features_are_appended_from_the_raw_frame():
    encoder = LowDimEncoder(BLOCKPUSH_META, features={"obs": ["blockpush_push_lines"]})
    assert encoder.raw_obs == ["obs"] and encoder.output_dim == 16 + 12
    raw = _blockpush_frame(block=[0.4, 0.0], effector=[0.41, -0.05], zone=[0.4, 0.2])
    normalized = torch.randn(1, 1, 16)
    out = encoder({"obs": normalized, raw_key("obs"): raw})
    torch.testing.assert_close(out[..., :16], normalized)
    torch.testing.assert_close(out[..., 16:], FEATURES["blockpush_push_lines"].fn(raw))


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        ({"c": ["blockpush_push_lines"]}, KeyError, "not among the encoder keys"),
        ({"obs": ["os.system"]}, ValueError, "is not one of"),
    ],
)
def test_bad_features_are_refused(features, error, match):
    with pytest.raises(error, match=match):
        LowDimEncoder(BLOCKPUSH_META, features=features)


def test_a_feature_refuses_a_frame_of_another_size():
    with pytest.raises(ValueError, match="reads 16 values"):
        LowDimEncoder(META, features={"a": ["blockpush_push_lines"]})
