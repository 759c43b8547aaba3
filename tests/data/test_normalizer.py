"""LinearNormalizer: fit to [-1, 1], round trip, constant dims, state_dict, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_policy.data.normalizer import LinearNormalizer


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    keypoint = rng.uniform(0, 512, size=(50, 4, 18)).astype(np.float32)  # (N, T, D)
    action = rng.normal(100, 30, size=(200, 2)).astype(np.float32)
    action[:, 1] = 7.0  # a constant dimension
    return {"keypoint": keypoint, "action": action}


def test_fit_maps_to_unit_range_and_round_trips(data):
    norm = LinearNormalizer({"keypoint": 18, "action": 2})
    norm.fit(data)
    out = norm.normalize({k: torch.from_numpy(v) for k, v in data.items()})
    kp = out["keypoint"]
    assert kp.shape == (50, 4, 18)
    assert kp.min() >= -1 - 1e-5 and kp.max() <= 1 + 1e-5
    torch.testing.assert_close(kp.flatten(0, 1).amin(0), -torch.ones(18), atol=1e-5, rtol=0)
    torch.testing.assert_close(kp.flatten(0, 1).amax(0), torch.ones(18), atol=1e-5, rtol=0)
    # The constant dimension maps to 0 with scale 1, not to inf/nan.
    assert torch.equal(out["action"][:, 1], torch.zeros(200))
    assert norm.stats()["action"]["scale"][1] == 1
    back = norm.unnormalize(out)
    for k, v in data.items():
        torch.testing.assert_close(back[k], torch.from_numpy(v), atol=1e-3, rtol=1e-5)


def test_state_dict_round_trip_into_fresh_normalizer(data):
    norm = LinearNormalizer({"keypoint": 18, "action": 2})
    norm.fit(data)
    fresh = LinearNormalizer({"keypoint": 18, "action": 2})
    x = torch.from_numpy(data["action"])
    assert torch.equal(fresh.normalize_key("action", x), x)  # identity before loading
    fresh.load_state_dict(norm.state_dict())
    assert torch.equal(fresh.normalize_key("action", x), norm.normalize_key("action", x))
    assert any(k.endswith("keypoint.scale") for k in norm.state_dict())


def test_errors_name_the_key():
    norm = LinearNormalizer({"action": 2})
    with pytest.raises(KeyError, match="no key 'state'"):
        norm.normalize_key("state", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"'action' expects \(\.\.\., 2\); got \(3, 5\)"):
        norm.unnormalize_key("action", torch.zeros(3, 5))
    with pytest.raises(KeyError, match="'img'"):
        norm.fit({"img": np.zeros((4, 2))})
