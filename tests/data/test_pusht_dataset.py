"""PushTKeypointDataset on a tiny hand-made store and on the real shared Push-T data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffusion_policy.data.normalizer import LinearNormalizer
from diffusion_policy.data.pusht_dataset import PushTKeypointDataset
from diffusion_policy.data.replay_buffer import ReplayBuffer

SHAPE_META = {
    "obs": {
        "keypoint": {"shape": [18], "type": "low_dim"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}


def test_tiny_dataset_samples(tiny_pusht_zarr):
    ds = PushTKeypointDataset(
        str(tiny_pusht_zarr), horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=0.25, seed=0
    )
    ends = np.array([20, 45, 75, 110])
    lengths = np.diff(ends, prepend=0)
    assert ds.val_mask.sum() == 1 and not (ds.train_mask & ds.val_mask).any()
    # Each episode gives len - 16 + 1 + 7 + 1 = len - 7 windows.
    assert len(ds) == (lengths[ds.train_mask] - 7).sum()
    assert len(ds.get_validation_dataset()) == (lengths[ds.val_mask] - 7).sum()
    assert ds.shape_meta == SHAPE_META

    sample = ds[0]
    first = np.concatenate([[0], ends[:-1]])[ds.train_mask][0]  # first train episode start
    assert sample["obs"]["keypoint"].shape == (2, 18)
    assert sample["obs"]["agent_pos"].dtype == torch.float32
    assert sample["action"].shape == (16, 2)
    # Values are global step indices: the first window repeats the episode's first frame.
    assert sample["obs"]["agent_pos"][:, 0].tolist() == [first, first]
    assert sample["action"][:3, 1].tolist() == [first, first, first + 1]

    idx = [0, 5, len(ds) - 1, 3]
    batch = ds.get_batch(idx)
    assert batch["obs"]["keypoint"].shape == (4, 2, 18) and batch["action"].shape == (4, 16, 2)
    for key in ("keypoint", "agent_pos"):
        assert torch.equal(batch["obs"][key], torch.stack([ds[i]["obs"][key] for i in idx]))
    assert torch.equal(batch["action"], torch.stack([ds[i]["action"] for i in idx]))

    # A DataLoader with a pass-through collate uses __getitems__: the same batch.
    loader = DataLoader(ds, batch_size=4, collate_fn=lambda b: b)
    assert torch.equal(next(iter(loader))["action"], ds.get_batch(range(4))["action"])

    norm_data = ds.get_normalizer_data()
    n_train_steps = lengths[ds.train_mask].sum()
    assert {k: v.shape for k, v in norm_data.items()} == {
        "keypoint": (n_train_steps, 18),
        "agent_pos": (n_train_steps, 2),
        "action": (n_train_steps, 2),
    }
    v = np.flatnonzero(ds.val_mask)[0]
    bounds = np.concatenate([[0], ends])
    val_steps = np.arange(bounds[v], bounds[v + 1])
    assert not np.isin(norm_data["action"][:, 0], val_steps).any()  # train episodes only


def test_real_replay_buffer(pusht_zarr_path):
    rb = ReplayBuffer.open(pusht_zarr_path, keys=["state", "keypoint", "action"])
    assert (rb.n_episodes, rb.n_steps) == (206, 25650)
    assert rb.episode_ends[0] == 161
    assert rb.episode_lengths.min() == 49 and rb.episode_lengths.max() == 246
    assert rb["keypoint"].shape == (25650, 9, 2) and rb["state"].dtype == np.float32


def test_real_keypoint_dataset(pusht_zarr_path):
    ds = PushTKeypointDataset(str(pusht_zarr_path), max_train_episodes=90)
    assert ds.train_mask.sum() == 90 and ds.val_mask.sum() == 4
    assert ds.shape_meta == SHAPE_META
    sample = ds[len(ds) // 2]
    assert sample["obs"]["keypoint"].shape == (2, 18)
    assert sample["obs"]["agent_pos"].shape == (2, 2)
    assert sample["action"].shape == (16, 2)

    norm = LinearNormalizer({"keypoint": 18, "agent_pos": 2, "action": 2})
    norm.fit(ds.get_normalizer_data())
    batch = ds.get_batch(np.random.default_rng(0).choice(len(ds), 512, replace=False))
    normed = [norm.normalize_key(k, v) for k, v in batch["obs"].items()]
    normed.append(norm.normalize_key("action", batch["action"]))
    for x in normed:
        assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5
    assert ds.get_validation_dataset()[0]["action"].shape == (16, 2)


def test_missing_store_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no store at"):
        PushTKeypointDataset(str(tmp_path / "missing.zarr"))
