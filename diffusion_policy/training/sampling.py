"""Sampling a trained policy with another diffusers scheduler (``scripts/eval.py``, tables)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_policy.training.stored_config import check_targets

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
