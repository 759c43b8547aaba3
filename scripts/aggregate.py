"""Aggregates the test scores of a sweep's runs across seeds, as the paper reports them.

    python scripts/aggregate.py multirun/2026-11-25/10-00-00_pusht_lowdim

Per run (one seed): the maximum test score over its evaluations and the mean of its last 10
evaluations; across seeds: their mean and standard deviation. Prints a table, and writes
``aggregate.json`` and ``aggregate.png`` (score against epoch per seed) into the sweep folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from diffusion_policy.analysis import plot_lines
from diffusion_policy.utils.atomic import atomic_write_text
from diffusion_policy.utils.jsonl import read_jsonl

METRIC = "test/mean_score"


def read_run(run_dir: Path, metric: str = METRIC) -> dict | None:
    """The evaluations ``[(epoch, score)]`` and seed of one run folder, or None if it has none."""
    evals = {}
    for record in read_jsonl(run_dir / "logs.jsonl"):
        if metric in record:
            evals[int(record.get("epoch", record["step"]))] = float(record[metric])
    if not evals:
        return None
    cfg_path = run_dir / "config.yaml"
    seed = yaml.safe_load(cfg_path.read_text()).get("seed") if cfg_path.exists() else None
    return {"run": str(run_dir), "seed": seed, "evals": sorted(evals.items())}


def summarize(runs: list[dict], last_n: int = 10) -> dict:
    """Per-run max and last-``last_n`` mean, and their mean and std across runs."""
    per_run = []
    for run in runs:
        scores = np.array([s for _, s in run["evals"]])
        per_run.append(
            {
                "run": run["run"],
                "seed": run["seed"],
                "n_evals": len(scores),
                "max": float(scores.max()),
                f"last{last_n}_mean": float(scores[-last_n:].mean()),
            }
        )
    summary = {}
    for key in ("max", f"last{last_n}_mean"):
        values = np.array([r[key] for r in per_run])
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        }
    return {"metric": METRIC, "n_runs": len(per_run), "per_run": per_run, "summary": summary}


def plot(runs: list[dict], path: Path) -> None:
    """Score against epoch, one line per seed."""
    lines = {f"seed {run['seed']}": tuple(zip(*run["evals"], strict=True)) for run in runs}
    plot_lines(lines, "epoch", METRIC, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--last-n", type=int, default=10, help="evaluations averaged at the end")
    args = parser.parse_args(argv)

    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 1
    runs = [r for p in sorted(args.sweep_dir.rglob("logs.jsonl")) if (r := read_run(p.parent))]
    if not runs:
        print(f"error: no run with {METRIC} evaluations under {args.sweep_dir}", file=sys.stderr)
        return 1
    result = summarize(runs, args.last_n)
    atomic_write_text(args.sweep_dir / "aggregate.json", json.dumps(result, indent=2))
    plot(runs, args.sweep_dir / "aggregate.png")

    last = f"last{args.last_n}_mean"
    print(f"| seed | evals | max | mean of last {args.last_n} |")
    print("| --- | --- | --- | --- |")
    for r in result["per_run"]:
        print(f"| {r['seed']} | {r['n_evals']} | {r['max']:.3f} | {r[last]:.3f} |")
    best, tail = result["summary"]["max"], result["summary"][last]
    print(
        f"| mean ± std ({result['n_runs']} seeds) | | {best['mean']:.3f} ± {best['std']:.3f}"
        f" | {tail['mean']:.3f} ± {tail['std']:.3f} |"
    )
    print(f"wrote {args.sweep_dir / 'aggregate.json'} and {args.sweep_dir / 'aggregate.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
