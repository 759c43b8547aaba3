"""Helpers shared by test modules (imported as ``tests.helpers``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import diffusion_policy.training  # noqa: F401 -- registers trainer/schema before any compose

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Imports ``scripts/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def debug_cfg(zarr: Path, *overrides: str, experiment: str = "pusht_lowdim") -> DictConfig:
    """A ``+debug=fast`` run of ``experiment`` on the store ``zarr``, W&B off, then overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"+experiment={experiment}",
                "+debug=fast",
                f"dataset.zarr_path={zarr}",
                "logger.mode=disabled",
                *overrides,
            ],
        )
