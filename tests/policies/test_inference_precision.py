"""bf16 weights for sampling: close to fp32, float32 samples, an exact step embedding."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_policy.denoisers.layers import SinusoidalStepEmbedding
from tests.deploy.fakes import tiny_policy


def _obs():
    g = torch.Generator().manual_seed(3)
    return {
        "keypoint": torch.rand(2, 2, 18, generator=g) * 512,
        "agent_pos": torch.rand(2, 2, 2, generator=g) * 512,
    }


def _predict(policy):
    out = policy.predict_action(_obs(), generator=torch.Generator().manual_seed(0))
    return out["action_pred"]


@pytest.mark.parametrize("use_plan", [True, False])
def test_bf16_weights_sample_close_to_fp32(use_plan):
    policy = tiny_policy()
    policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), 4)
    policy.use_sampler_plan = use_plan
    fp32 = _predict(policy)
    assert policy.set_inference_precision("bf16") == "bf16"
    assert next(policy.denoiser.parameters()).dtype == torch.bfloat16
    bf16 = _predict(policy)
    assert bf16.dtype == torch.float32
    # Actions span ~512 px; bf16 keeps about 3 significant digits through 4 steps.
    assert (bf16 - fp32).abs().max() < 0.05 * 512
    assert not torch.equal(bf16, fp32)


def test_fp32_keeps_the_weights():
    policy = tiny_policy()
    before = _predict(policy)
    assert policy.set_inference_precision("fp32") == "fp32"
    torch.testing.assert_close(_predict(policy), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision"):
        policy.set_inference_precision("fp16")


def test_step_embedding_in_bf16_rounds_only_its_output():
    embed = SinusoidalStepEmbedding(64)
    t = torch.tensor([0, 7, 50, 99])
    exact = embed(t)
    embed.to(torch.bfloat16)
    rounded = embed(t)
    assert rounded.dtype == torch.bfloat16
    # Only the output is rounded (~0.4% of 1); bf16 frequencies would miss by up to 0.4 rad.
    assert (rounded.float() - exact).abs().max() < 1e-2
