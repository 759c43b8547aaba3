"""The own-motion probe: predicted next moves on windows with the pusher's past motion scaled."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_policy.envs.blockpush_actions import scale_own_motion
from diffusion_policy.envs.blockpush_oracle import generate_blockpush
from diffusion_policy.envs.blockpush_probe import own_motion_probe, probe_windows
from diffusion_policy.training.builders import build_policy
from tests.helpers import CONFIG_DIR


@pytest.fixture(scope="module")
def policy_and_windows(tmp_path_factory):
    store = tmp_path_factory.mktemp("blockpush") / "tiny.zarr"
    generate_blockpush(store, n_episodes=2, seed=0, progress=False)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["+experiment=blockpush_lowdim_cpu", f"dataset.zarr_path={store}"],
        )
    dataset = instantiate(cfg.dataset)
    policy = build_policy(cfg, dataset.shape_meta).eval()
    policy.normalizer.fit(dataset.get_normalizer_data())
    return policy, *probe_windows(dataset, 16, seed=0)


def test_probe_reports_the_policys_moves_at_each_scale(policy_and_windows):
    policy, obs, targets = policy_and_windows
    assert obs.shape == (16, 2, 16) and targets.shape == (16, 2)
    results = own_motion_probe(policy, obs, targets, scales=(0.0, 1.0), seed=3)
    current = obs[:, -1, 8:10]
    for scale in (0.0, 1.0):
        scaled = scale_own_motion(obs, torch.full((16,), scale))
        g = torch.Generator().manual_seed(3)
        move = policy.predict_action({"obs": scaled}, generator=g)["action"][:, 0] - current
        assert results[scale]["move"] == pytest.approx(float(move.norm(dim=1).mean()), rel=1e-5)
        demo = (targets - current).norm(dim=1).mean()
        assert results[scale]["demo_move"] == pytest.approx(float(demo), rel=1e-6)
        assert -1 <= results[scale]["cosine"] <= 1
    # The demonstrated moves are the oracle's: within its step limit, not all zero.
    assert 0 < results[1.0]["demo_move"] < 0.1 * 2**0.5
    # Windows whose pusher moved differ at scale 0, so some predictions change.
    assert results[0.0]["move"] != results[1.0]["move"]


def test_probe_rejects_windows_of_another_length(policy_and_windows):
    policy, obs, targets = policy_and_windows
    with pytest.raises(ValueError, match=r"expected \(N, 2, 16\)"):
        own_motion_probe(policy, obs[:, -1:], targets)
