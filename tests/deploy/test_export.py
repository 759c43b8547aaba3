"""Export then load gives the same actions; a tampered config.json is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_policy.deploy.export import ExportError, export_policy, load_exported
from diffusion_policy.deploy.onnx_policy import OnnxPolicy
from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.training.builders import load_policy
from tests.deploy.fakes import TINY_CFG, tiny_policy, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _obs(batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "keypoint": torch.rand(batch, 2, 18, generator=g) * 512,
        "agent_pos": torch.rand(batch, 2, 2, generator=g) * 512,
    }


def _actions(policy) -> torch.Tensor:
    return policy.predict_action(_obs(), generator=torch.Generator().manual_seed(5))["action"]


@pytest.fixture
def exported(tmp_path) -> tuple[object, Path]:
    write_checkpoint(tmp_path / "tiny.ckpt", tiny_policy())
    policy, cfg = load_policy(tmp_path / "tiny.ckpt")  # EMA weights
    return policy, export_policy(policy, cfg, tmp_path / "export")


def test_export_then_load_gives_identical_actions(exported):
    policy, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_exported(folder)
    assert torch.equal(_actions(loaded), _actions(policy))
    for key, value in policy.state_dict().items():  # normalizer buffers included
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_learned_noise_policy_is_exported_with_the_policy(tmp_path):
    policy = tiny_policy()
    policy.noise_policy = NoisePolicy(2 * policy.encoder.output_dim, policy.horizon, 2, [8])
    torch.nn.init.normal_(policy.noise_policy.mean_net[-1].weight)  # as if trained
    cfg = OmegaConf.create(TINY_CFG)
    loaded = load_exported(export_policy(policy, cfg, tmp_path / "export"))
    assert loaded.noise_policy.config() == policy.noise_policy.config()
    assert torch.equal(_actions(loaded), _actions(policy))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["policy"]["noise_policy"]["depth"] = 3
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"noise_policy: unknown keys \['depth'\]"):
        load_exported(tmp_path / "export")


@pytest.mark.slow  # a subprocess: ~25 s of imports and an ONNX export on a busy machine
def test_export_script_writes_the_ema_weights_and_the_graph(tmp_path):
    write_checkpoint(tmp_path / "tiny.ckpt", tiny_policy())
    out = tmp_path / "export"
    cmd = [
        sys.executable,
        "scripts/export.py",
        f"checkpoint={tmp_path / 'tiny.ckpt'}",
        f"out={out}",
        "onnx=true",
        "noise_scheduler=ddim",  # the checkpoint's DDPM draws noise: no graph
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ema, _ = load_policy(tmp_path / "tiny.ckpt", use_ema=True)
    loaded = load_exported(out)
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    graph = OnnxPolicy(out / "policy.onnx")
    assert graph.sampler == type(loaded.noise_scheduler).__name__ == "DDIMScheduler"
    assert torch.allclose(_actions(graph), _actions(loaded), atol=2e-3)


def _tamper(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["encoder"].update({"class": "os.system"}), r"encoder.class='os.system'"),
        (lambda c: c["denoiser"].update({"class": "Sequential"}), "denoiser.class='Sequential'"),
        (
            lambda c: c["noise_scheduler"].update({"class": "DiffusionPipeline"}),
            "not a diffusers noise scheduler",
        ),
        (
            lambda c: c["denoiser"]["kwargs"].update({"_target_": "os.system"}),
            r"denoiser.kwargs._target_",
        ),
        (
            lambda c: c["encoder"].update({"_target_": "builtins.eval"}),
            r"config.encoder._target_",
        ),
        (
            lambda c: c["denoiser"]["kwargs"].update({"down_dims": "${oc.env:HOME}"}),
            "interpolations are not plain values",
        ),
        (
            lambda c: c["encoder"]["kwargs"].update(
                {"keys": {"class": "ResNetKeypointEncoder", "kwargs": {"weights": "/etc/x"}}}
            ),
            "would read a file",
        ),
        (lambda c: c["policy"].update({"horizon": 1.5}), "horizon=1.5"),
        (lambda c: c.update({"format": "other/9"}), "format='other/9'"),
        (lambda c: c.update({"extra": 1}), r"unknown keys \['extra'\]"),
    ],
)
def test_a_tampered_config_is_refused(exported, edit, match):
    _, folder = exported
    _tamper(folder, edit)
    with pytest.raises(ExportError, match=match):
        load_exported(folder)


def test_non_finite_numbers_and_missing_weights_are_refused(exported):
    _, folder = exported
    text = (folder / "config.json").read_text().replace('"beta_start": 0.0001', '"beta_start": NaN')
    (folder / "config.json").write_text(text)
    with pytest.raises(ExportError, match="not a finite number"):
        load_exported(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="has no model.safetensors"):
        load_exported(folder)


def test_an_untrusted_class_is_not_exported(tmp_path):
    policy = tiny_policy()
    cfg = {"encoder": {"_target_": "my_pkg.Encoder"}, "denoiser": {}}
    with pytest.raises(ExportError, match=r"encoder._target_='my_pkg.Encoder' is not exportable"):
        export_policy(policy, cfg, tmp_path / "out")
