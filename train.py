"""Trains a diffusion policy: `python train.py +experiment=pusht_lowdim [overrides]`.

On several GPUs: `torchrun --nproc_per_node=N train.py ...` (see README, "Scaling and sweeps").
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.training.builders import resolve_device
from diffusion_policy.training.checkpoint import CheckpointError
from diffusion_policy.training.config_checks import ConfigError, check_device
from diffusion_policy.training.distributed import (
    broadcast_object,
    env_rank,
    init_distributed,
    shutdown,
)
from diffusion_policy.training.interrupt import TrainingInterrupted
from diffusion_policy.training.nonfinite import NonFiniteLossError, NonFiniteWeightsError
from diffusion_policy.training.run_dir import RunFolderError
from diffusion_policy.training.trainer import Trainer

# Under torchrun, the ranks other than 0 write nothing of Hydra's (no run folder, .hydra/ or log
# file): they are given rank 0's run folder.
QUIET_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]

# Errors the user can act on: reported in one line, without a traceback.
USER_ERRORS = (
    ConfigError,
    DatasetError,
    CheckpointError,
    RunFolderError,
    NonFiniteLossError,
    NonFiniteWeightsError,
)


def resume_command(overrides: list[str], run_dir: str) -> str:
    """The command that continues this run: its overrides, ``resume=true`` and its folder."""
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.run.dir="))]
    return " ".join(["python train.py", *kept, "resume=true", f"hydra.run.dir={run_dir}"])


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
    try:
        check_device(cfg.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
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
        # The trainer writes <run dir>/config.yaml once the run folder is accepted.
        try:
            trainer = Trainer(cfg, run_dir)
            trainer.train()
        except USER_ERRORS as e:
            # Errors the user can act on: one line, no traceback.
            sys.exit(f"error: {e}")
        except InstantiationException as e:
            # What a dataset (or other part) raised while Hydra built it, e.g. a missing store.
            if isinstance(e.__cause__, USER_ERRORS):
                sys.exit(f"error: {e.__cause__}")
            raise
        except TrainingInterrupted as e:
            e.resume_command = resume_command(hydra_cfg.overrides.task, run_dir)
            print(e, file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
            print(f"interrupted; nothing more was saved in {run_dir}", file=sys.stderr)
            sys.exit(130)
        return trainer.best_score
    finally:
        shutdown(dist_info)


if __name__ == "__main__":
    if env_rank() > 0:
        sys.argv += QUIET_RANK_OVERRIDES
    main()
