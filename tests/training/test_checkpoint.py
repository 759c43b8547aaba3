import os
import pickle

import pytest
import torch
from torch import nn

from diffusion_policy.training.checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
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


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    # Before: "holds objects other than tensors and plain data" (torch's unpickling error).
    path = tmp_path / "noise.ckpt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"noise.ckpt is not a checkpoint: not a file wr"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("model", "model/1.weight"),
        ("ema", "ema/0.bias"),
        ("optimizer", "optimizer/state/0/exp_avg"),
    ],
)
def test_nonfinite_state_is_never_written(tmp_path, where, key):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "ema": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": 1,
    }
    path = tmp_path / "latest.ckpt"
    save_checkpoint(path, state)
    before = path.read_bytes()
    if where == "optimizer":
        state["optimizer"]["state"][0]["exp_avg"][0, 0] = float("inf")
    else:
        state[where][key.split("/", 1)[1]][0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError) as err:
        save_checkpoint(path, state)
    assert isinstance(err.value, CheckpointError)
    assert f"{key} (shape" in str(err.value) and "previous latest.ckpt is untouched" in str(
        err.value
    )
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.ckpt"]


def test_topk_names_have_no_equals_and_old_names_still_count(tmp_path):
    # Old runs named their top-k files with "=", which Hydra cannot parse in checkpoint=PATH.
    old = tmp_path / "epoch=0010-test_mean_score=0.500.ckpt"
    save_checkpoint(old, {"epoch": 10})
    topk = TopKCheckpoints(tmp_path, k=2)
    assert topk.existing() == [(0.5, old)]
    new = topk.save(20, 0.7, {"epoch": 20})
    assert new.name == "epoch_0020-test_mean_score_0.700.ckpt" and "=" not in new.name
    topk.save(30, 0.6, {"epoch": 30})  # displaces the old-named file on resume
    assert [p.name for _, p in topk.existing()] == [
        "epoch_0020-test_mean_score_0.700.ckpt",
        "epoch_0030-test_mean_score_0.600.ckpt",
    ]
    assert not old.exists()


def test_checkpoint_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "a.ckpt", {"epoch": 1})  # was 0o600 (mkstemp)
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o640
