import json
from pathlib import Path

import pytest

from tests.helpers import load_script

aggregate = load_script("aggregate")


def _fake_run(folder: Path, seed: int, scores: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    lines = [json.dumps({"step": 1, "train/loss": 0.5})]
    lines += [
        json.dumps({"step": 10 * (i + 1), "epoch": 50 * (i + 1) - 1, "test/mean_score": s})
        for i, s in enumerate(scores)
    ]
    (folder / "logs.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "tes')  # cut short


def test_aggregate_across_seeds(tmp_path, capsys):
    _fake_run(tmp_path / "0_seed=1", 1, [0.2] * 5 + [0.9] + [0.5] * 10)
    _fake_run(tmp_path / "1_seed=2", 2, [0.1] * 3 + [0.7] * 10)
    assert aggregate.main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "aggregate.json").read_text())
    per_seed = {r["seed"]: r for r in result["per_run"]}
    assert per_seed[1]["max"] == 0.9 and per_seed[1]["last10_mean"] == pytest.approx(0.5)
    assert per_seed[2]["max"] == 0.7 and per_seed[2]["last10_mean"] == pytest.approx(0.7)
    assert result["summary"]["max"]["mean"] == pytest.approx(0.8)
    assert result["summary"]["max"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert (tmp_path / "aggregate.png").stat().st_size > 1000
    assert "0.800 ± 0.141" in capsys.readouterr().out


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    assert aggregate.main([str(tmp_path)]) == 1
    assert "no run with test/mean_score" in capsys.readouterr().err
