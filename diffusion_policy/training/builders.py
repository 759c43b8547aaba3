"""Builds policies from a Hydra config, and loads trained policies from checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.training.checkpoint import CheckpointError, load_checkpoint, load_model_state

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """Maps ``"auto"`` to CUDA when available, else CPU; any other value is used as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_policy(cfg: DictConfig, shape_meta: Mapping[str, Any]) -> DiffusionPolicy:
    """Instantiates the encoder, denoiser and noise scheduler of ``cfg`` into one policy.

    Shapes are wired here, not in YAML: the encoder is built from the dataset's shape
    description and reports its feature size, from which the policy builds the denoiser.
    """
    encoder = instantiate(cfg.encoder, shape_meta=shape_meta)
    return DiffusionPolicy(
        shape_meta=shape_meta,
        encoder=encoder,
        denoiser=instantiate(cfg.denoiser),
        noise_scheduler=instantiate(cfg.noise_scheduler),
        horizon=cfg.horizon,
        n_obs_steps=cfg.n_obs_steps,
        n_action_steps=cfg.n_action_steps,
        num_inference_steps=cfg.policy.num_inference_steps,
    )


def load_policy(
    path: str | Path,
    device: str | torch.device = "cpu",
    overrides: DictConfig | Mapping[str, Any] | None = None,
    use_ema: bool = True,
) -> tuple[DiffusionPolicy, DictConfig]:
    """Rebuilds a trained policy from a checkpoint, in eval mode.

    Args:
        path: A checkpoint written by the trainer.
        device: Where to put the policy.
        overrides: Config values merged over the stored config, e.g. another
            ``noise_scheduler`` or ``policy.num_inference_steps`` for sampling.
        use_ema: Load the EMA weights (what the trainer evaluates) when the checkpoint has them.

    Returns:
        The policy and the (merged) config it was built from.
    """
    state = load_checkpoint(path)
    for key in ("config", "shape_meta", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry")
    cfg = OmegaConf.create(state["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    policy = build_policy(cfg, state["shape_meta"])
    weights = state["ema"]["model"] if use_ema and state.get("ema") else state["model"]
    load_model_state(policy, weights, what=f"checkpoint {path}")
    return policy.to(resolve_device(str(device))).eval(), cfg
