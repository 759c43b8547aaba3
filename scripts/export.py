"""Exports a checkpoint as ``model.safetensors`` + ``config.json`` (see diffusion_policy.deploy).

    python scripts/export.py checkpoint=outputs/.../checkpoints/latest.ckpt out=exports/pusht
    python scripts/export.py checkpoint=... out=... use_ema=false num_inference_steps=16
    python scripts/export.py checkpoint=... out=... onnx=true   # + out/policy.onnx
    python scripts/export.py checkpoint=... out=... onnx=true onnx_weights=int8

The folder loads with ``diffusion_policy.deploy.export.load_exported(out)`` (no Hydra, nothing
from the folder is run), serves with ``scripts/serve.py checkpoint=out``, and uploads as it is
with ``huggingface_hub.upload_folder``. With ``onnx=true`` the folder also holds
``policy.onnx``, the whole sampling as one graph for ONNX Runtime
(:mod:`diffusion_policy.deploy.onnx_policy`; needs the ``onnx`` extra and a deterministic
sampler: ``noise_scheduler=ddim`` etc. for a DDPM checkpoint). Quote a checkpoint path
holding ``=`` for Hydra: ``'checkpoint="run/epoch=0049-test_mean_score=0.691.ckpt"'``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from diffusion_policy.deploy.export import export_policy, load_exported
from diffusion_policy.training.builders import load_policy
from diffusion_policy.training.sampling import sampling_scheduler

ONNX_FILE = "policy.onnx"


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    policy, train_cfg = load_policy(
        cfg.checkpoint, "cpu", use_ema=cfg.use_ema, trusted_targets=cfg.trusted_targets
    )
    scheduler = policy.noise_scheduler
    if cfg.get("noise_scheduler"):
        scheduler = sampling_scheduler(train_cfg.noise_scheduler, cfg.noise_scheduler)
    policy.set_sampler(scheduler, cfg.num_inference_steps)
    out = export_policy(policy, train_cfg, cfg.out)
    # What was written loads back to the same weights.
    loaded = load_exported(out)
    for key, value in policy.state_dict().items():
        if not torch.equal(value, loaded.state_dict()[key]):
            raise RuntimeError(f"export check failed: {key} differs after loading {out}")
    if cfg.onnx:
        from diffusion_policy.deploy.onnx_policy import export_onnx  # the `onnx` extra

        # Checked against the policy's actions.
        export_onnx(policy, Path(out) / ONNX_FILE, weights=cfg.onnx_weights)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"exported {cfg.checkpoint} ({n_params / 1e6:.2f}M parameters) to {out}")


if __name__ == "__main__":
    main()
