"""Scripts import the installed package (no ``sys.path`` edits) and quote pasted checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_do_not_edit_sys_path(script):
    assert "sys.path" not in script.read_text()


def test_pasted_checkpoint_with_equals_is_quoted_for_hydra():
    path = "outputs/run/checkpoints/epoch=0049-test_mean_score=0.691.ckpt"
    args = [f"checkpoint={path}", "runner.n_test=2", "checkpoint_x=a=b"]
    quoted = load_script("eval").quote_checkpoint_override(args)
    assert quoted == [f'checkpoint="{path}"', "runner.n_test=2", "checkpoint_x=a=b"]
    already = [f"checkpoint='{path}'", "checkpoint=plain/latest.ckpt"]
    assert load_script("eval").quote_checkpoint_override(already) == already
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        assert compose(config_name="eval", overrides=quoted[:1]).checkpoint == path
        with pytest.raises(Exception, match="mismatched input '='"):
            compose(config_name="eval", overrides=args[:1])  # what Hydra does unquoted


def test_topk_checkpoint_names_need_no_quoting(tmp_path):
    from diffusion_policy.training.checkpoint import TopKCheckpoints

    path = TopKCheckpoints(tmp_path, k=1).save(49, 0.691, {"epoch": 49})
    assert path.name == "epoch_0049-test_mean_score_0.691.ckpt"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        assert compose(config_name="eval", overrides=[f"checkpoint={path}"]).checkpoint == str(path)


def test_results_are_written_with_file_permissions(tmp_path):
    aggregate = load_script("aggregate")
    run = tmp_path / "run"
    run.mkdir()
    (run / "logs.jsonl").write_text('{"step": 1, "epoch": 0, "test/mean_score": 0.5}\n')
    assert aggregate.main([str(tmp_path)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("aggregate.json", "aggregate.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
