"""Compiling a policy for serving, and paying the compile before the first request."""

from __future__ import annotations

import logging
import time

import torch

from diffusion_policy.data.keys import LOW_DIM
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy

log = logging.getLogger(__name__)


def example_obs(policy: DiffusionPolicy, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Zero observations of the policy's shapes: {key: (B, To, ...)}, float32 or uint8 images."""
    device = next(policy.parameters()).device
    obs = {}
    for key, meta in policy.shape_meta["obs"].items():
        dtype = torch.float32 if meta["type"] == LOW_DIM else torch.uint8
        shape = (batch_size, policy.n_obs_steps, *meta["shape"])
        obs[key] = torch.zeros(shape, dtype=dtype, device=device)
    return obs


def compile_for_inference(policy: DiffusionPolicy, batch_size: int = 1) -> float:
    """Compiles sampling for static shapes and warms it up at ``batch_size``.

    See :meth:`DiffusionPolicy.compile_sampling`: the whole denoising loop where the sampler is
    deterministic, else the denoiser. ``torch.compile`` compiles on the first call; here that
    call is a prediction on :func:`example_obs`, so a server's first client (or a timed
    benchmark) does not wait for it. Other batch sizes compile on their first use.

    Returns:
        The seconds the compile and warm-up took.
    """
    start = time.perf_counter()
    policy.compile_sampling()
    policy.predict_action(example_obs(policy, batch_size))
    seconds = time.perf_counter() - start
    log.info("compiled sampling for batch %d in %.1f s", batch_size, seconds)
    return seconds
