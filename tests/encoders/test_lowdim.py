"""The low-dim encoder: concatenated observations, or an MLP over them trained with the policy."""

from __future__ import annotations

import pytest
import torch

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
    assert encoder.raw_obs == {"a": [1]}
    obs = _obs()
    out = encoder(obs)  # (B, To, 2 + 3 + 2): a without its angle, b's kept values, cos, sin
    assert encoder.output_dim == 7 and out.shape == (4, 2, 7)
    torch.testing.assert_close(out[..., :2], obs["a"][..., [0, 2]])
    torch.testing.assert_close(out[..., 2:5], obs["b"].flatten(2)[..., :3])
    angle = obs["a"][..., 1]
    torch.testing.assert_close(out[..., 5], torch.cos(4 * angle))
    torch.testing.assert_close(out[..., 6], torch.sin(4 * angle))
    # A quarter turn (and the wrap at +-pi) of a 4-fold symmetric object looks the same.
    turned = {k: v.clone() for k, v in obs.items()}
    turned["a"][..., 1] += torch.pi / 2
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
