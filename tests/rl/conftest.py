"""Fixtures of the RL fine-tuning tests."""

from __future__ import annotations

import pytest

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from tests.rl.tiny_policy import make_tiny_policy


@pytest.fixture(autouse=True)
def _gemm_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-shape timing of the convolution paths: PPO minibatches come in many shapes."""
    monkeypatch.setenv("DP_CONV_PATH", "gemm")


@pytest.fixture
def tiny_policy() -> DiffusionPolicy:
    return make_tiny_policy()
