"""Trains a diffusion policy: `python train.py +experiment=pusht_lowdim [overrides]`.

On several GPUs: `torchrun --nproc_per_node=N train.py ...` (see README, "Scaling and sweeps").
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.training.builders import resolve_device
from diffusion_policy.training.checkpoint import CheckpointError, atomic_write, describe_os_error
from diffusion_policy.training.distributed import (
    broadcast_object,
    env_rank,
    init_distributed,
    shutdown,
)
from diffusion_policy.training.trainer import NonFiniteLossError, Trainer

# Under torchrun, the ranks other than 0 write nothing of Hydra's (no run folder, .hydra/ or log
# file): they are given rank 0's run folder.
QUIET_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a sweep's runs, from its folder: ``2026-11-25_10-00-00_pusht_lowdim``."""
    return "_".join(Path(sweep_dir).parts[-2:])


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Trains one run (in a multirun: one of its jobs).

    Returns:
        The run's best test score, which a Hydra sweeper such as Optuna maximizes; None
        without rollouts, and on ranks other than 0.
    """
    dist_info, _ = init_distributed(resolve_device(cfg.device))
    try:
        hydra_cfg = HydraConfig.get()
        # Each rank's Hydra picked a folder from its own clock: rank 0's is the run's.
        run_dir = broadcast_object(hydra_cfg.runtime.output_dir, dist_info)
        if hydra_cfg.mode == RunMode.MULTIRUN and cfg.logger.group is None:
            cfg.logger.group = sweep_group(hydra_cfg.sweep.dir)  # one W&B group per sweep
        if "optuna" in str(hydra_cfg.sweeper.get("_target_")) and not cfg.trainer.rollout_every:
            # Fail now rather than when the sweeper reads the result, after training.
            sys.exit(
                "error: trainer.rollout_every=0, but an Optuna search maximizes the rollouts' "
                "test score: set trainer.rollout_every > 0"
            )
        if dist_info.is_main:
            config_path = Path(run_dir) / "config.yaml"
            try:
                atomic_write(
                    config_path, lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True).encode())
                )
            except OSError as e:
                sys.exit(f"error: cannot write {config_path}: {describe_os_error(e)}")
        try:
            trainer = Trainer(cfg, run_dir)
            trainer.train()
        except (DatasetError, CheckpointError, NonFiniteLossError) as e:
            # Errors the user can act on: one line, no traceback.
            sys.exit(f"error: {e}")
        return trainer.best_score
    finally:
        shutdown(dist_info)


if __name__ == "__main__":
    if env_rank() > 0:
        sys.argv += QUIET_RANK_OVERRIDES
    main()
