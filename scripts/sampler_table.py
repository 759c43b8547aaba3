"""Score and latency of one checkpoint under several samplers (scheduler x denoising steps).

    python scripts/sampler_table.py outputs/.../checkpoints/latest.ckpt
    python scripts/sampler_table.py CKPT --settings ddpm:100 ddim:8 --n-test 10 --out table.json

Each setting replaces the trained scheduler for sampling only (as ``scripts/eval.py
noise_scheduler=NAME num_inference_steps=N`` does; the weights are loaded once), is scored on
the runner's test seeds (no train seeds, no videos) and timed: the latency per action chunk is
the median wall time of ``predict_action`` on one observation (batch 1) over ``--calls`` calls.
Prints a markdown table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.training.builders import load_policy
from diffusion_policy.training.sampling import sampling_scheduler
from diffusion_policy.training.stored_config import instantiate_stored
from diffusion_policy.utils.atomic import atomic_write_text
from diffusion_policy.utils.timing import timed

REPO = Path(__file__).resolve().parents[1]  # for configs/

DEFAULT_SETTINGS = ["ddpm:100", "ddim:16", "ddim:8", "ddim:4", "dpmsolver:8", "dpmsolver:4"]
SCHEDULER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "dpmsolver": "DPM-Solver++",
    "unipc": "UniPC",
}


class ObsRecorder:
    """Passes calls to the policy and keeps the first observation, cut to batch 1."""

    def __init__(self, policy: DiffusionPolicy) -> None:
        self.policy = policy
        self.device = next(policy.parameters()).device
        self.obs: dict[str, torch.Tensor] | None = None

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.obs is None:
            self.obs = {k: v[:1].clone() for k, v in obs.items()}
        return self.policy.predict_action(obs)


def chunk_latency(policy: DiffusionPolicy, obs: dict[str, torch.Tensor], calls: int) -> float:
    """Median seconds of one ``predict_action`` at batch 1, after two warm-up calls."""
    return statistics.median(timed(lambda: policy.predict_action(obs), calls, warmup=2))


def parse_setting(setting: str) -> tuple[str, int]:
    name, _, steps = setting.partition(":")
    path = REPO / "configs" / "noise_scheduler" / f"{name}.yaml"
    if not path.is_file() or not steps.isdigit():
        raise SystemExit(
            f"setting {setting!r}: expected NAME:STEPS with NAME a config of {path.parent}"
        )
    return name, int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="NAME:STEPS")
    parser.add_argument("--n-test", type=int, default=50, help="test seeds (from 100000)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: next to ckpt)")
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.settings]

    policy, train_cfg = load_policy(args.checkpoint, args.device)
    runner_cfg = OmegaConf.merge(
        train_cfg.env_runner, {"n_test": args.n_test, "n_train": 0, "n_videos": 0}
    )
    runner = instantiate_stored(runner_cfg, "env_runner", output_dir=None)  # from the file

    rows: list[dict[str, Any]] = []
    for name, steps in settings:
        requested = OmegaConf.load(REPO / "configs" / "noise_scheduler" / f"{name}.yaml")
        policy.set_sampler(sampling_scheduler(train_cfg.noise_scheduler, requested), steps)
        recorder = ObsRecorder(policy)
        torch.manual_seed(args.seed)
        result = runner.run(recorder)
        latency = chunk_latency(policy, recorder.obs, args.calls)
        rows.append(
            {
                "scheduler": name,
                "class": type(policy.noise_scheduler).__name__,
                "num_inference_steps": steps,
                "test_mean_score": result["test/mean_score"],
                "test_success_rate": result["test/success_rate"],
                "n_test": args.n_test,
                "latency_ms": 1000 * latency,
            }
        )
        print(f"{name} {steps}: {rows[-1]}", file=sys.stderr)

    report = {
        "checkpoint": str(args.checkpoint),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    out = args.out or args.checkpoint.with_suffix(".sampler_table.json")
    atomic_write_text(out, json.dumps(report, indent=2))

    print("| Sampler | Steps | Mean score | Success rate | Latency / chunk (ms) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        label = SCHEDULER_NAMES.get(r["scheduler"], r["scheduler"])
        print(
            f"| {label} | {r['num_inference_steps']} | {r['test_mean_score']:.3f} | "
            f"{r['test_success_rate']:.2f} | {r['latency_ms']:.1f} |"
        )
    print(f"\nrows: {out}")


if __name__ == "__main__":
    main()
