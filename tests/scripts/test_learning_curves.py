import json
from pathlib import Path

from tests.helpers import load_script

learning_curves = load_script("learning_curves")


def _fake_run(folder: Path, points: list[tuple[float, float]]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": 1, "train/loss": 0.5, "lr": 1e-3})]
    lines += [
        json.dumps(
            {
                "step": 100 * (i + 1),
                "train/minutes": m,
                "test/mean_score": s,
                "test/success_rate": 0.1,
            }
        )
        for i, (m, s) in enumerate(points)
    ]
    (folder / "logs.jsonl").write_text("\n".join(lines) + '\n{"step": 9')  # cut short


def test_curves_table_and_png(tmp_path, capsys):
    _fake_run(tmp_path / "a", [(2.0, 0.3), (4.1, 0.7)])
    _fake_run(tmp_path / "b", [(10.0, 0.9)])
    out = tmp_path / "docs" / "curves"
    assert (
        learning_curves.main([f"{tmp_path / 'a'}:20 min", str(tmp_path / "b"), "--out", str(out)])
        == 0
    )
    table = out.with_suffix(".md").read_text()
    assert "**20 min**" in table and "**b**" in table
    assert "| 4.1 | 200 | 0.700 | 0.10 |" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_run_without_timed_evaluations_is_an_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "logs.jsonl").write_text(json.dumps({"step": 1, "test/mean_score": 0.5}))
    assert learning_curves.main([str(tmp_path / "r"), "--out", str(tmp_path / "x")]) == 1
    assert "train/minutes" in capsys.readouterr().out
