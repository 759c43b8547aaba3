"""Builds policies from a Hydra config, and loads trained policies from checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.training.checkpoint import CheckpointError, load_checkpoint, load_model_state
from diffusion_policy.training.stored_config import instantiate_stored

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
    For a config the user composed; a stored one goes through :func:`load_policy`.
    """
    return _build_policy(cfg, shape_meta, lambda node, where, **kw: instantiate(node, **kw))


def action_origin(cfg: DictConfig) -> dict[str, list[int]] | None:
    """``policy.action_origin`` of ``cfg`` as plain data (None when absent: older configs)."""
    origin = cfg.policy.get("action_origin")
    return OmegaConf.to_container(origin) if origin else None


def _build_policy(
    cfg: DictConfig, shape_meta: Mapping[str, Any], make: Callable[..., Any]
) -> DiffusionPolicy:
    return DiffusionPolicy(
        shape_meta=shape_meta,
        encoder=make(cfg.encoder, "encoder", shape_meta=shape_meta),
        denoiser=make(cfg.denoiser, "denoiser"),
        noise_scheduler=make(cfg.noise_scheduler, "noise_scheduler"),
        horizon=cfg.horizon,
        n_obs_steps=cfg.n_obs_steps,
        n_action_steps=cfg.n_action_steps,
        num_inference_steps=cfg.policy.num_inference_steps,
        action_origin=action_origin(cfg),
        noise_policy=_plain(cfg.policy.get("noise_policy")),
    )


def _plain(node: Any) -> Any:
    """A config node as plain Python (dicts and lists); None stays None."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_policy(
    path: str | Path,
    device: str | torch.device = "cpu",
    overrides: DictConfig | Mapping[str, Any] | None = None,
    use_ema: bool = True,
    trusted_targets: Iterable[str] = (),
) -> tuple[DiffusionPolicy, DictConfig]:
    """Rebuilds a trained policy from a checkpoint, in eval mode.

    The checkpoint's stored config is data: it may only build the project's own classes and
    diffusers schedulers (see :mod:`~diffusion_policy.training.stored_config`).

    Args:
        path: A checkpoint written by the trainer.
        device: Where to put the policy.
        overrides: Config values merged over the stored config, e.g. another
            ``noise_scheduler`` or ``policy.num_inference_steps`` for sampling.
        use_ema: Load the EMA weights (what the trainer evaluates) when the checkpoint has them.
        trusted_targets: Further class names (``_target_``) the stored config may build.

    Returns:
        The policy and the (merged) config it was built from.

    Raises:
        CheckpointError: The file is not a checkpoint, lacks an entry, or its config names a
            class that is not trusted (:class:`UntrustedConfigError`).
    """
    state = load_checkpoint(path)
    for key in ("config", "shape_meta", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry")
    if not isinstance(state["config"], Mapping):
        raise CheckpointError(f"checkpoint {path}: its 'config' entry is not a mapping")
    cfg = OmegaConf.create(state["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    make = partial(instantiate_stored, trusted=trusted_targets)
    policy = _build_policy(cfg, state["shape_meta"], make)
    weights = state["ema"]["model"] if use_ema and state.get("ema") else state["model"]
    load_model_state(policy, weights, what=f"checkpoint {path}")
    return policy.to(resolve_device(str(device))).eval(), cfg
