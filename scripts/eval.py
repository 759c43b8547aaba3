"""Scores a checkpoint by rollouts and writes per-seed results as JSON.

    python scripts/eval.py checkpoint=outputs/.../checkpoints/latest.ckpt
    python scripts/eval.py checkpoint=... noise_scheduler=ddim num_inference_steps=16

Another ``noise_scheduler`` replaces the trained one for sampling only: it keeps the trained
noise schedule and prediction type (see :func:`sampling_scheduler`), so any scheduler config of
``configs/noise_scheduler`` applies to any checkpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_policy.training.builders import load_policy  # noqa: E402
from diffusion_policy.training.stored_config import (  # noqa: E402
    check_targets,
    instantiate_stored,
)

# Scheduler settings that define what the denoiser was trained on; a sampling scheduler keeps
# the checkpoint's values. Everything else (the class, clipping, solver order) is a sampling
# choice.
TRAINED_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def sampling_scheduler(trained: Mapping[str, Any], requested: Mapping[str, Any]) -> Any:
    """Instantiates the ``requested`` scheduler config on the ``trained`` one's noise schedule.

    Args:
        trained: The checkpoint's ``noise_scheduler`` config.
        requested: A ``noise_scheduler`` config, e.g. ``configs/noise_scheduler/ddim.yaml``.

    Returns:
        The diffusers scheduler.
    """
    cfg = OmegaConf.to_container(OmegaConf.create(dict(requested)), resolve=True)
    trained = OmegaConf.to_container(OmegaConf.create(dict(trained)), resolve=True)
    stored = {k: trained[k] for k in TRAINED_KEYS if k in trained}
    check_targets(stored, "noise_scheduler")  # values from the checkpoint build nothing else
    cfg.update(stored)
    return instantiate(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    checkpoint = Path(cfg.checkpoint)
    trusted = cfg.trusted_targets
    policy, train_cfg = load_policy(
        checkpoint, cfg.device, use_ema=cfg.use_ema, trusted_targets=trusted
    )
    # Replaced rather than merged over the stored config: keys of one scheduler class (DDPM's
    # variance_type) are not arguments of another (DDIM).
    scheduler = policy.noise_scheduler
    if cfg.get("noise_scheduler"):
        scheduler = sampling_scheduler(train_cfg.noise_scheduler, cfg.noise_scheduler)
    policy.set_sampler(scheduler, cfg.num_inference_steps)
    if cfg.compile:
        policy.denoiser.compile(dynamic=False)  # same actions within float32 round-off

    out_dir = Path(cfg.output_dir or checkpoint.parent.parent / "eval" / checkpoint.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner_cfg = OmegaConf.merge(
        train_cfg.env_runner, {k: v for k, v in cfg.runner.items() if v is not None}
    )
    runner = instantiate_stored(
        runner_cfg, "env_runner", trusted=trusted, output_dir=str(out_dir / "media")
    )

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
