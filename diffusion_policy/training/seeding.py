"""Seeds and random states: one seed for a run's data and weights, one stream per rank."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_policy.training.distributed import DistInfo

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for one rank's training noise, independent of other ranks' and other seeds'."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """torch's random state (training draws from torch only: noise, timesteps, crops, dropout)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Mapping[str, torch.Tensor | None], device: torch.device) -> None:
    """Restores a state saved by :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_rng_state(
    rng_states: Sequence[Mapping[str, Any]], dist: DistInfo, device: torch.device, path: Path
) -> None:
    """Continues this rank's random stream from a checkpoint's per-rank states.

    The steps after a resume then draw the same noise as in an uninterrupted run. A checkpoint
    saved by another number of processes cannot be continued exactly: the streams restart.
    """
    if len(rng_states) == dist.world_size:
        set_rng_state(rng_states[dist.rank], device)
        return
    log.warning(
        "%s was saved by %d processes, this run has %d: the random streams restart, so "
        "the run goes on, but not exactly as an uninterrupted one would",
        path,
        len(rng_states),
        dist.world_size,
    )
