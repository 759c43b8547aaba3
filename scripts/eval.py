"""Scores a checkpoint by rollouts and writes per-seed results as JSON.

    python scripts/eval.py checkpoint=outputs/.../checkpoints/latest.ckpt
    python scripts/eval.py checkpoint=... noise_scheduler=ddim num_inference_steps=16
    python scripts/eval.py checkpoint=... onnx=int8   # as the exported graph samples

Another ``noise_scheduler`` replaces the trained one for sampling only: it keeps the trained
noise schedule and prediction type (see :func:`sampling_scheduler`), so any scheduler config of
``configs/noise_scheduler`` applies to any checkpoint. ``onnx=fp32|int8`` scores the policy as
``scripts/export.py onnx=true`` would deploy it: its sampling exported as an ONNX graph
(``<output_dir>/policy.onnx``; int8: 8-bit weights) and run by ONNX Runtime.

A checkpoint path containing ``=`` (top-k files of older runs: ``epoch=0049-...=0.691.ckpt``)
is quoted for Hydra by this script; elsewhere quote it yourself:
``'checkpoint="outputs/run/checkpoints/epoch=0049-test_mean_score=0.691.ckpt"'``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.training.builders import load_policy
from diffusion_policy.training.sampling import sampling_scheduler
from diffusion_policy.training.stored_config import instantiate_stored
from diffusion_policy.utils.atomic import atomic_write_text

__all__ = ["main", "quote_checkpoint_override", "sampling_scheduler"]


def quote_checkpoint_override(args: list[str]) -> list[str]:
    """Quotes the value of a ``checkpoint=PATH`` argument that holds ``=``, for Hydra.

    Hydra's override grammar refuses ``=`` in an unquoted value, so a pasted path like
    ``checkpoint=run/epoch=0049-test_mean_score=0.691.ckpt`` would fail to parse.

    Args:
        args: Command-line arguments (without the program name).

    Returns:
        ``args`` with such a value put in quotes; other arguments unchanged.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "checkpoint" and sep and "=" in value and value[:1] not in ("'", '"'):
            quote = next((q for q in ('"', "'") if q not in value and "\\" not in value), None)
            if quote is not None:
                arg = f"{key}={quote}{value}{quote}"
        out.append(arg)
    return out


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
    if cfg.runner.get("n_action_steps") is not None:  # chunks as long as the runner executes
        policy.set_n_action_steps(cfg.runner.n_action_steps)
    if cfg.compile and not cfg.onnx:
        policy.compile_sampling(whole_loop=False)  # a quick compile; float32 round-off apart
    sampler = type(policy.noise_scheduler).__name__

    out_dir = Path(cfg.output_dir or checkpoint.parent.parent / "eval" / checkpoint.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.onnx:
        from diffusion_policy.deploy.onnx_policy import OnnxPolicy, export_onnx  # `onnx` extra

        graph = export_onnx(policy.cpu(), out_dir / "policy.onnx", weights=cfg.onnx)
        policy = OnnxPolicy(graph, threads=torch.get_num_threads())
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
        "noise_scheduler": sampler,
        "num_inference_steps": policy.num_inference_steps,
        "onnx": cfg.onnx,
        "n_action_steps": runner.n_action_steps,
        "replan_at": runner.replan_at,
        "ensemble_decay": runner.ensemble_decay,
        "coherence_samples": runner.coherence_samples,
        **summary,
        "per_episode": result.get("per_episode", []),
        "videos": [str(v) for v in result.get("videos", [])],
    }
    path = out_dir / "eval_results.json"
    atomic_write_text(path, json.dumps(report, indent=2))  # complete or absent, even if killed
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"per-seed results: {path}")


if __name__ == "__main__":
    sys.argv[1:] = quote_checkpoint_override(sys.argv[1:])
    main()
