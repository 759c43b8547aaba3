"""A checkpoint's stored config is data: loading it builds only trusted classes."""

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffusion_policy.training.builders import build_policy, load_policy
from diffusion_policy.training.checkpoint import save_checkpoint
from diffusion_policy.training.stored_config import (
    UntrustedConfigError,
    check_targets,
    instantiate_stored,
)
from tests.policies.test_diffusion_policy import SHAPE_META
from tests.policies.test_schedulers import compose_cfg

# Each creates the file PWNED in the working directory if it is ever called.
TOUCH = {"_target_": "pathlib.Path.touch", "self": "PWNED"}
HOSTILE = {
    "top-level target": ("encoder", {"_target_": "os.system", "command": "touch PWNED"}),
    "nested argument": (
        "denoiser",
        {
            "_target_": "diffusion_policy.denoisers.unet.ConditionalUnet1D",
            "down_dims": {"_target_": "subprocess.call", "args": ["touch", "PWNED"]},
        },
    ),
    "_args_": (
        "noise_scheduler",
        {"_target_": "builtins.exec", "_args_": ["open('PWNED', 'w').close()"]},
    ),
    "target inside _args_ of a trusted class": (
        "noise_scheduler",
        {"_target_": "diffusers.DDPMScheduler", "_args_": [TOUCH]},
    ),
    "target in a list": ("denoiser", {"down_dims": [16, TOUCH]}),
    "diffusers loader": (
        "noise_scheduler",
        {
            "_target_": "diffusers.DDPMScheduler.from_pretrained",
            "pretrained_model_name_or_path": "x",
        },
    ),
    "name a project module imports": (
        "encoder",
        {"_target_": "diffusion_policy.envs.runner.partial", "_args_": [TOUCH]},
    ),
    "project function": (
        "encoder",
        {"_target_": "diffusion_policy.training.checkpoint.atomic_write"},
    ),
    "private project class": ("encoder", {"_target_": "diffusion_policy.envs.runner._Stats"}),
}


@pytest.fixture
def policy_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    cfg = compose_cfg("unet", "ddpm")
    policy = build_policy(cfg, SHAPE_META)
    state = {
        "model": policy.state_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "shape_meta": SHAPE_META,
    }
    path = tmp_path / "good.ckpt"
    save_checkpoint(path, state)
    return path, state


def test_trusted_checkpoint_loads(policy_checkpoint):
    path, _ = policy_checkpoint
    policy, cfg = load_policy(path)
    assert type(policy.noise_scheduler).__name__ == "DDPMScheduler"
    assert cfg.denoiser._target_.endswith("ConditionalUnet1D")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoint_config_is_refused_without_running(
    case, policy_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _, state = policy_checkpoint
    key, hostile = HOSTILE[case]
    state = copy.deepcopy(state)
    state["config"][key] = {**state["config"][key], **hostile}
    path = tmp_path / "evil.ckpt"
    save_checkpoint(path, state)
    with pytest.raises(UntrustedConfigError, match=rf"{key}\S*_target_=.* is refused"):
        load_policy(path)
    assert not (tmp_path / "PWNED").exists()


def test_stored_env_runner_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = {"_target_": "diffusion_policy.envs.runner.PushTRunner", "env_fn": TOUCH}
    with pytest.raises(UntrustedConfigError, match=r"env_runner\.env_fn\._target_"):
        instantiate_stored(runner, "env_runner", output_dir=str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


def test_user_trusted_target_is_allowed():
    cfg = {"_target_": "collections.OrderedDict", "a": 1}
    with pytest.raises(UntrustedConfigError):
        check_targets(cfg, "encoder")
    built = instantiate_stored(cfg, "encoder", trusted=["collections.OrderedDict"])
    assert dict(built) == {"a": 1}


def test_non_string_target_is_refused():
    with pytest.raises(UntrustedConfigError, match="must be a class name"):
        check_targets({"x": {"_target_": 3}}, "encoder")
