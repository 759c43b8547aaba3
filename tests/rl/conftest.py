"""Fixtures of the RL fine-tuning tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from tests.rl.tiny_policy import make_tiny_policy


@pytest.fixture(autouse=True)
def _fast_small_convolutions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Gemm convolutions on one thread for the tiny UNet.

    PPO minibatches come in many shapes, each of which would be timed once on the "auto"
    path; and on a busy machine a second intra-op thread makes tiny convolutions 30x slower.
    """
    monkeypatch.setenv("DP_CONV_PATH", "gemm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_policy() -> DiffusionPolicy:
    return make_tiny_policy()
