"""Scores a checkpoint by rollouts and writes per-seed results as JSON.

    python scripts/eval.py checkpoint=outputs/.../checkpoints/latest.ckpt
    python scripts/eval.py checkpoint=... noise_scheduler=ddim num_inference_steps=16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_policy.training.builders import load_policy  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    checkpoint = Path(cfg.checkpoint)
    overrides = {}
    if cfg.get("noise_scheduler"):
        overrides["noise_scheduler"] = OmegaConf.to_container(cfg.noise_scheduler)
    if cfg.num_inference_steps:
        overrides["policy"] = {"num_inference_steps": cfg.num_inference_steps}
    policy, train_cfg = load_policy(checkpoint, cfg.device, overrides, use_ema=cfg.use_ema)

    out_dir = Path(cfg.output_dir or checkpoint.parent.parent / "eval" / checkpoint.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner_cfg = OmegaConf.merge(
        train_cfg.env_runner, {k: v for k, v in cfg.runner.items() if v is not None}
    )
    runner = instantiate(runner_cfg, output_dir=str(out_dir / "media"))

    torch.manual_seed(cfg.seed)
    result = runner.run(policy)

    summary = {k: v for k, v in result.items() if isinstance(v, int | float)}
    report = {
        "checkpoint": str(checkpoint),
        "noise_scheduler": type(policy.noise_scheduler).__name__,
        "num_inference_steps": policy.num_inference_steps,
        **summary,
        "per_episode": result.get("per_episode", []),
        "videos": [str(v) for v in result.get("videos", [])],
    }
    path = out_dir / "eval_results.json"
    path.write_text(json.dumps(report, indent=2))
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"per-seed results: {path}")


if __name__ == "__main__":
    main()
