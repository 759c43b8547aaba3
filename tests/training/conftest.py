"""Fixtures of the training tests: one finished small run per module, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diffusion_policy.training.trainer import Trainer


@pytest.fixture(scope="module")
def one_epoch_run(request, tmp_path_factory, pusht_zarr_path) -> Path:
    """A run folder after one epoch of the module's ``_cfg(zarr, *overrides)`` config."""
    run = tmp_path_factory.mktemp("one_epoch") / "run"
    Trainer(request.module._cfg(pusht_zarr_path, "trainer.num_epochs=1"), run).train()
    return run


@pytest.fixture
def run_copy(one_epoch_run, tmp_path) -> Path:
    """A copy of :func:`one_epoch_run` that a test may change."""
    return Path(shutil.copytree(one_epoch_run, tmp_path / "run"))
