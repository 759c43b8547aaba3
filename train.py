"""Trains a diffusion policy: `python train.py +experiment=pusht_lowdim [overrides]`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.training.checkpoint import CheckpointError, atomic_write, describe_os_error
from diffusion_policy.training.trainer import NonFiniteLossError, Trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    config_path = Path(run_dir) / "config.yaml"
    try:
        atomic_write(config_path, lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True).encode()))
    except OSError as e:
        sys.exit(f"error: cannot write {config_path}: {describe_os_error(e)}")
    try:
        metrics = Trainer(cfg, run_dir).train()
    except (DatasetError, CheckpointError, NonFiniteLossError) as e:
        # Errors the user can act on: one line, no traceback.
        sys.exit(f"error: {e}")
    # Returned for Hydra sweepers (e.g. Optuna), which maximize or minimize it.
    return metrics.get("test/mean_score")


if __name__ == "__main__":
    main()
