"""The ONNX graph of a policy's sampling gives the policy's actions; other files are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from omegaconf import OmegaConf

from diffusion_policy.data.keys import RGB
from diffusion_policy.deploy.client import PolicyClient
from diffusion_policy.deploy.onnx_policy import (
    METADATA_KEY,
    Conv1dAs2d,
    ExpMish,
    OnnxExportError,
    OnnxPolicy,
    export_onnx,
)
from diffusion_policy.deploy.warmup import set_inference_threads
from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.training.builders import build_policy
from tests.deploy.fakes import PUSHT_SHAPE_META, TINY_CFG, serving, tiny_policy

KEY_DIMS = {"keypoint": 18, "agent_pos": 2, "action": 2}


def _obs(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return {
        "keypoint": torch.rand(batch, 2, 18, generator=g) * 512,
        "agent_pos": torch.rand(batch, 2, 2, generator=g) * 512,
    }


def _ddim_policy():
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    return policy


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[object, Path]:
    policy = _ddim_policy()
    return policy, export_onnx(policy, tmp_path_factory.mktemp("onnx") / "policy.onnx")


@pytest.mark.parametrize("batch", [1, 4])
def test_the_graph_samples_the_policys_actions_for_the_same_noise(exported, batch):
    policy, path = exported
    onnx_policy = OnnxPolicy(path)
    assert (onnx_policy.n_obs_steps, onnx_policy.n_action_steps, onnx_policy.horizon) == (
        policy.n_obs_steps,
        policy.n_action_steps,
        policy.horizon,
    )
    obs = _obs(batch)
    mine = onnx_policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    theirs = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    assert mine["action"].shape == theirs["action"].shape == (batch, policy.n_action_steps, 2)
    # Actions span 0..512 px; a wrong step or a wrong input would be off by pixels.
    assert torch.allclose(mine["action_pred"], theirs["action_pred"], atol=2e-3)
    other = onnx_policy.predict_action(obs, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(other["action"], mine["action"])  # the noise is an input
    with pytest.raises(ValueError, match=r"observation 'keypoint': \(B, \(2, 18\)\) expected"):
        onnx_policy.predict_action({**obs, "keypoint": obs["keypoint"][:, :1]})


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv1d(4, 6, kernel_size=5, padding=2),
        torch.nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=1, bias=False),
        torch.nn.ConvTranspose1d(4, 6, kernel_size=4, stride=2, padding=1),
    ],
)
def test_a_1d_convolution_written_as_2d_gives_the_same_output(conv):
    x = torch.randn(3, 4, 16)
    assert torch.allclose(Conv1dAs2d(conv)(x), conv(x), atol=1e-6)


def test_mish_as_exp_arithmetic_is_mish_everywhere():
    x = torch.cat([torch.linspace(-60.0, 60.0, 20001), torch.tensor([-1e30, 1e30])])
    expected = torch.nn.functional.mish(x.double())
    got = ExpMish()(x).double()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_multistep_solver_exports_too(tmp_path):
    policy = tiny_policy()
    config = {**policy.noise_scheduler.config, "thresholding": True, "sample_max_value": 1.0}
    config.pop("clip_sample", None)
    policy.set_sampler(DPMSolverMultistepScheduler.from_config(config), 3)
    path = export_onnx(policy, tmp_path / "dpm.onnx")  # its own check compares the actions
    assert OnnxPolicy(path).sampler == "DPMSolverMultistepScheduler"


def test_relative_actions_export_with_their_origin(tmp_path):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["policy"] = {**cfg.get("policy", {}), "action_origin": {"agent_pos": [0, 1]}}
    torch.manual_seed(0)
    policy = build_policy(OmegaConf.create(cfg), PUSHT_SHAPE_META)
    policy.normalizer.fit({k: torch.rand(64, d) * 512 for k, d in KEY_DIMS.items()})
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    path = export_onnx(policy.eval(), tmp_path / "relative.onnx")
    obs = _obs(2)
    mine = OnnxPolicy(path).predict_action(obs, generator=torch.Generator().manual_seed(3))
    theirs = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    # Without the origin (the current agent position, 0..512 px) they would differ by pixels.
    assert torch.allclose(mine["action_pred"], theirs["action_pred"], atol=2e-3)


def test_a_sampler_that_draws_noise_is_refused(tmp_path):
    with pytest.raises(OnnxExportError, match="DDPMScheduler .* not a deterministic sampler"):
        export_onnx(tiny_policy(), tmp_path / "ddpm.onnx")
    assert not (tmp_path / "ddpm.onnx").exists()


def test_a_learned_noise_policy_is_refused(tmp_path):
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    policy.noise_policy = NoisePolicy(2 * policy.encoder.output_dim, policy.horizon, 2)
    with pytest.raises(OnnxExportError, match="has a noise_policy .* would drop it"):
        export_onnx(policy, tmp_path / "steered.onnx")
    assert not (tmp_path / "steered.onnx").exists()


def test_an_image_policy_exports_with_uint8_images(tmp_path):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["encoder"] = {
        "_target_": "diffusion_policy.encoders.multimodal.ObsEncoder",
        "backbone": {
            "_target_": "diffusion_policy.encoders.resnet.ResNetKeypointEncoder",
            "_partial_": True,
            "width": 8,
            "group_size": 4,
            "num_keypoints": 4,
            "feature_dim": 6,
        },
        "crop_size": [28, 28],  # a 1 x 1 map at the spatial softmax: its grid is one point
    }
    meta = {
        "obs": {"image": {"shape": [32, 32, 3], "type": RGB}, **PUSHT_SHAPE_META["obs"]},
        "action": {"shape": [2]},
    }
    policy = build_policy(OmegaConf.create(cfg), meta)
    g = torch.Generator().manual_seed(0)
    policy.normalizer.fit({k: torch.rand(64, d, generator=g) * 512 for k, d in KEY_DIMS.items()})
    policy.eval().set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    graph = OnnxPolicy(export_onnx(policy, tmp_path / "image.onnx"))  # checked at export
    obs = {**_obs(2), "image": torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)}
    mine = graph.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    theirs = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    assert torch.isfinite(mine).all() and torch.allclose(mine, theirs, atol=2e-3)


def test_a_graph_without_our_metadata_or_not_onnx_is_refused(exported, tmp_path):
    _, path = exported
    model = onnx.load(path)
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "stripped.onnx")
    with pytest.raises(OnnxExportError, match="no 'diffusion_policy' metadata"):
        OnnxPolicy(tmp_path / "stripped.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxExportError, match="junk.onnx: ONNX Runtime cannot load it"):
        OnnxPolicy(tmp_path / "junk.onnx")


def test_tampered_metadata_is_refused(exported, tmp_path):
    _, path = exported
    model = onnx.load(path)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = prop.value.replace('"horizon": ', '"horizon": -')
    onnx.save(model, tmp_path / "tampered.onnx")
    with pytest.raises(OnnxExportError, match="horizon=-"):
        OnnxPolicy(tmp_path / "tampered.onnx")


def test_threads_are_chosen_by_timing_and_one_session_is_kept(exported):
    _, path = exported
    onnx_policy = OnnxPolicy(path)
    chosen = set_inference_threads(onnx_policy, "auto")
    assert chosen == onnx_policy.threads >= 1
    assert list(onnx_policy._sessions) == [chosen]
    with pytest.raises(ValueError, match="threads=0"):
        onnx_policy.set_num_threads(0)


def test_the_server_serves_the_graph(exported):
    _, path = exported
    onnx_policy = OnnxPolicy(path)
    obs = _obs(2)
    with serving(onnx_policy) as (_, address), PolicyClient(address, timeout_s=5) as client:
        served = client.predict_action(obs, generator=torch.Generator().manual_seed(1))
        local = onnx_policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(torch.as_tensor(served["action"]), local["action"])
