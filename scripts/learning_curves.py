"""Learning curves against training time: test score per run, as a PNG and a markdown table.

    python scripts/learning_curves.py outputs/run_a:20min outputs/run_b:60min --out docs/cpu

Each argument is a run folder, optionally ``:LABEL``. The x axis is ``train/minutes``, the
trainer's clock of training time (rollout evaluations excluded), logged with every evaluation.
Writes ``<out>.png`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion_policy.analysis import plot_lines
from diffusion_policy.utils.atomic import atomic_write_text
from diffusion_policy.utils.jsonl import read_jsonl

SCORE, SUCCESS, MINUTES = "test/mean_score", "test/success_rate", "train/minutes"


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """``[{minutes, step, score, success}]`` of every evaluation of a run, in order."""
    return [
        {
            "minutes": r[MINUTES],
            "step": r["step"],
            "score": r[SCORE],
            "success": r.get(SUCCESS, float("nan")),
        }
        for r in read_jsonl(run_dir / "logs.jsonl")
        if SCORE in r and MINUTES in r
    ]


def markdown(curves: dict[str, list[dict[str, float]]]) -> str:
    lines = []
    for label, curve in curves.items():
        lines += [
            f"**{label}**",
            "",
            "| training minutes | optimizer steps | test mean score | test success rate |",
            "| ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {p['minutes']:.1f} | {p['step']} | {p['score']:.3f} | {p['success']:.2f} |"
            for p in curve
        ]
        lines.append("")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    lines = {k: ([p["minutes"] for p in c], [p["score"] for p in c]) for k, c in curves.items()}
    plot_lines(lines, "training minutes (evaluation excluded)", "test mean score", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR:LABEL")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    curves = {}
    for arg in args.runs:
        run, _, label = arg.partition(":")
        curve = read_curve(Path(run))
        if not curve:
            print(f"error: {run} has no evaluation with {MINUTES} in its logs.jsonl")
            return 1
        curves[label or Path(run).name] = curve
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out.with_suffix(".png"))
    table = markdown(curves)
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
