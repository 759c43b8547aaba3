import os
import pickle

import pytest
import torch
from torch import nn

from diffusion_policy.training.checkpoint import (
    CheckpointError,
    TopKCheckpoints,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"model": model.state_dict(), "config": {"a": [1, 2]}, "epoch": 3})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["config"] == {"a": [1, 2]}
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"format_version": 1, "model": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    path = tmp_path / "trunc.ckpt"
    save_checkpoint(path, {"model": nn.Linear(30, 30).state_dict()})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    other = tmp_path / "other.ckpt"
    other.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError):
        load_checkpoint(other)


def test_mismatching_model_names_keys_and_shapes():
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    dst = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as err:
        load_model_state(dst, src.state_dict(), what="checkpoint x")
    msg = str(err.value)
    assert "0.weight: checkpoint (4, 3) vs model (8, 3)" in msg
    assert "missing keys ['2.bias', '2.weight']" in msg


def test_topk_keeps_best_k(tmp_path):
    topk = TopKCheckpoints(tmp_path, k=2)
    for epoch, score in enumerate([0.3, 0.5, 0.1, 0.7]):
        topk.save(epoch, score, {"epoch": epoch})
    assert [s for s, _ in topk.existing()] == [0.7, 0.5]
    assert load_checkpoint(topk.best())["epoch"] == 3
    # Rebuilt from the files: a resumed run keeps ranking against the old ones.
    assert TopKCheckpoints(tmp_path, k=2).save(9, 0.2, {}) is None
