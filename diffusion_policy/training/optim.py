"""Optimizers with parameter groups: which parameters get weight decay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

WEIGHT_DECAY_RULES = ("all", "matrices")

# Modules whose weight matrices are decayed under the "matrices" rule. nn.MultiheadAttention's
# input projection is its own `in_proj_weight`; its output projection is an nn.Linear.
_MATRIX_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)
_MATRIX_NAMES = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Splits trainable parameters into (decayed, not decayed) by the "matrices" rule.

    Decayed: the weight matrices (>= 2-D) of linear, convolution and attention layers. Not
    decayed: everything else, i.e. biases, normalization weights, embedding tables, position
    embeddings and any other free-standing parameter.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_matrix = (
                isinstance(module, _MATRIX_MODULES) and name in _MATRIX_NAMES and param.ndim >= 2
            )
            (decay if is_matrix else no_decay).append(param)
    return decay, no_decay


def build_optimizer(
    optimizer: DictConfig | Mapping[str, Any], model: nn.Module
) -> torch.optim.Optimizer:
    """Instantiates the optimizer config for ``model``'s parameters.

    The config is a Hydra partial (``_target_: torch.optim.AdamW``, ``_partial_: true``, ...)
    with one extra, optional key read here: ``weight_decay_on``.

    - ``"all"`` (default): one group, ``weight_decay`` on every parameter.
    - ``"matrices"``: ``weight_decay`` on weight matrices only, none on biases, norms and
      embeddings (:func:`split_decay`); what the transformer denoiser trains with.

    Args:
        optimizer: The ``optimizer`` config group.
        model: The model whose parameters are optimized.

    Returns:
        The optimizer.

    Raises:
        ValueError: ``weight_decay_on`` names no known rule.
    """
    cfg = OmegaConf.create(
        OmegaConf.to_container(optimizer, resolve=True)
        if isinstance(optimizer, DictConfig)
        else dict(optimizer)
    )
    rule = cfg.pop("weight_decay_on", "all")
    factory = instantiate(cfg)
    if rule == "all":
        return factory(params=model.parameters())
    if rule == "matrices":
        decay, no_decay = split_decay(model)
        weight_decay = float(cfg.get("weight_decay", 0.0))
        return factory(
            params=[
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
        )
    raise ValueError(f"optimizer.weight_decay_on={rule!r} is not one of {WEIGHT_DECAY_RULES}")
