"""SequenceSampler: window contents, edge padding, episode boundaries and the batch path."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_policy.data.sampler import SequenceSampler


def reference_windows(lengths, horizon, n_obs, n_act, mask=None):
    """Brute-force window table: the definition, written as loops."""
    rows, start = [], 0
    for e, n in enumerate(lengths):
        if mask is None or mask[e]:
            for k in range(-(n_obs - 1), n - horizon + (n_act - 1) + 1):
                rows.append([start + min(max(k + t, 0), n - 1) for t in range(horizon)])
        start += n
    return np.array(rows, dtype=np.intp).reshape(-1, horizon)


def make_sampler(lengths, horizon, n_obs, n_act, mask=None):
    n = sum(lengths)
    data = {
        "obs": np.arange(n, dtype=np.float32)[:, None].repeat(3, 1),  # (n, 3)
        "action": np.arange(n, dtype=np.float32)[:, None].repeat(2, 1),  # (n, 2)
    }
    ends = np.cumsum(lengths)
    return SequenceSampler(data, ends, horizon, n_obs, n_act, obs_keys=["obs"], episode_mask=mask)


def test_windows_and_padding_at_both_edges():
    s = make_sampler((5, 7), horizon=4, n_obs=2, n_act=3)  # pad_before 1, pad_after 2
    # Windows per episode: len - horizon + pad_before + pad_after + 1 = len here.
    assert len(s) == 5 + 7
    first, last = s.sample(0), s.sample(4)
    np.testing.assert_array_equal(first["action"][:, 0], [0, 0, 1, 2])  # first frame repeated
    np.testing.assert_array_equal(first["obs"][:, 0], [0, 0])
    np.testing.assert_array_equal(last["action"][:, 0], [3, 4, 4, 4])  # last frame repeated
    np.testing.assert_array_equal(last["obs"][:, 0], [3, 4])
    np.testing.assert_array_equal(s.sample(5)["action"][:, 0], [5, 5, 6, 7])
    np.testing.assert_array_equal(s.sample(11)["action"][:, 0], [10, 11, 11, 11])
    np.testing.assert_array_equal(s.sample(-1)["obs"][:, 1], [10, 11])
    assert first["obs"].shape == (2, 3) and first["action"].shape == (4, 2)


@pytest.mark.parametrize(
    ("lengths", "horizon", "n_obs", "n_act"),
    [((5, 7), 4, 2, 3), ((5, 7), 5, 1, 1), ((16, 3, 9), 6, 3, 6), ((2, 30), 16, 2, 8)],
)
def test_index_table_matches_definition(lengths, horizon, n_obs, n_act):
    s = make_sampler(lengths, horizon, n_obs, n_act)
    ref = reference_windows(lengths, horizon, n_obs, n_act)
    np.testing.assert_array_equal(s.indices, ref)
    # No window crosses an episode boundary.
    episode = np.searchsorted(np.cumsum(lengths), s.indices, side="right")  # (N, T)
    assert (episode == episode[:, :1]).all()


def test_short_episode_gives_no_window_and_mask_selects_episodes():
    s = make_sampler((2, 7), horizon=6, n_obs=1, n_act=1)  # 2 - 6 + 1 <= 0
    assert len(s) == 2 and s.indices.min() >= 2
    masked = make_sampler((5, 7), horizon=4, n_obs=2, n_act=3, mask=np.array([False, True]))
    assert len(masked) == 7 and masked.indices.min() == 5
    with pytest.raises(ValueError, match=r"episode_mask has shape \(3,\)"):
        make_sampler((5, 7), 4, 2, 3, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="n_obs_steps=5 must be in"):
        make_sampler((5, 7), 4, 5, 3)


def test_sample_batch_equals_stacked_samples():
    s = make_sampler((5, 7, 9), horizon=4, n_obs=2, n_act=3)
    idx = np.array([0, 4, 5, 11, 20, 3])
    batch = s.sample_batch(idx)
    for key in ("obs", "action"):
        np.testing.assert_array_equal(batch[key], np.stack([s.sample(i)[key] for i in idx]))
    assert batch["obs"].shape == (6, 2, 3) and batch["action"].shape == (6, 4, 2)
