"""Fine-tunes a trained diffusion policy with DPPO:
`python finetune.py +experiment=pusht_lowdim_rl checkpoint=PATH [overrides]`.

See docs/rl_finetuning.md.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_policy.rl.finetuner import FineTuner
from diffusion_policy.training.checkpoint import CheckpointError
from diffusion_policy.training.run_dir import RunFolderError

# Errors the user can act on: reported in one line, without a traceback.
USER_ERRORS = (CheckpointError, RunFolderError, ValueError)


@hydra.main(version_base="1.3", config_path="configs/finetune", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    """Runs one fine-tuning; returns the best test score (None without evaluations)."""
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        tuner = FineTuner(cfg, run_dir)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    return tuner.run()


if __name__ == "__main__":
    main()
