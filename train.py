"""Trains a diffusion policy: `python train.py +experiment=pusht_lowdim [overrides]`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.training.checkpoint import CheckpointError
from diffusion_policy.training.trainer import Trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    OmegaConf.save(cfg, f"{run_dir}/config.yaml", resolve=True)
    try:
        metrics = Trainer(cfg, run_dir).train()
    except (DatasetError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    # Returned for Hydra sweepers (e.g. Optuna), which maximize or minimize it.
    return metrics.get("test/mean_score")


if __name__ == "__main__":
    main()
