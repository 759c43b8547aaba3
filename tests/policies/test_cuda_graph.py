"""Sampling replayed as CUDA graphs (the GPU tests run where CUDA is available)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_policy.policies.cuda_graph import GraphedSampler
from tests.policies.test_diffusion_policy import make_batch
from tests.policies.test_schedulers import compose_cfg, fitted_policy

# The graph runs the compiled denoiser: other kernels, the same samples up to round-off.
CLOSE = {"atol": 5e-4, "rtol": 5e-4}


def needs_cuda(test):
    """Marked ``gpu`` (``make test-all`` runs it) and skipped without a CUDA device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


def test_inputs_off_the_gpu_run_eagerly():
    calls = []

    def sample(noise, cond):
        calls.append(noise.device)
        return noise * 2 + cond.sum()

    graphed = GraphedSampler(sample)
    out = graphed(torch.ones(1, 4, 2), torch.zeros(1, 2, 3))
    torch.testing.assert_close(out, torch.full((1, 4, 2), 2.0))
    assert calls == [torch.device("cpu")]
    assert graphed.n_graphs == 0


def test_plan_timesteps_are_made_once_per_plan():
    policy = fitted_policy(compose_cfg("unet", "dpmsolver"), make_batch(B=1))
    plan = policy.sampler_plan()
    first = policy._plan_timesteps(plan, torch.device("cpu"))
    assert policy._plan_timesteps(plan, torch.device("cpu")) is first
    assert first.tolist() == list(plan.timesteps)
    policy.set_sampler(policy.noise_scheduler, 4)
    other = policy._plan_timesteps(policy.sampler_plan(), torch.device("cpu"))
    assert other is not first and len(other) == 4


@needs_cuda
@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_graph_replays_what_the_eager_loop_samples(denoiser):
    batch = make_batch(B=2)
    policy = fitted_policy(compose_cfg(denoiser, "dpmsolver"), batch).eval().cuda()
    obs = {k: v.cuda() for k, v in batch["obs"].items()}
    cond = policy.encode_obs(obs)  # (B, To, F)
    noise = torch.randn(2, policy.horizon, policy.action_dim, device="cuda")
    with torch.no_grad():
        eager = policy.sample_with_plan(noise, cond)
        policy.compile_sampling()
        graphed = policy._compiled_sample
        assert isinstance(graphed, GraphedSampler)
        for _ in range(2):  # captured on the first call, replayed on the second
            torch.testing.assert_close(graphed(noise, cond), eager, **CLOSE)
        assert graphed.n_graphs == 1
        # Another batch size, then another sampler: each gets its own graph.
        torch.testing.assert_close(graphed(noise[:1], cond[:1]), eager[:1], **CLOSE)
        ddim = DDIMScheduler.from_config(policy.noise_scheduler.config)
        policy.set_sampler(ddim, 5)
        expected = policy.sample_with_plan(noise, cond)
        torch.testing.assert_close(graphed(noise, cond), expected, **CLOSE)
        assert graphed.n_graphs == 3
        # predict_action goes through the graph.
        actions = policy.predict_action(obs)["action"]
        assert actions.is_cuda and torch.isfinite(actions).all()


@needs_cuda
def test_graph_sees_weights_loaded_in_place():
    batch = make_batch(B=1)
    policy = fitted_policy(compose_cfg("unet", "dpmsolver"), batch).eval().cuda()
    obs = {k: v.cuda() for k, v in batch["obs"].items()}
    cond = policy.encode_obs(obs)
    noise = torch.randn(1, policy.horizon, policy.action_dim, device="cuda")
    policy.compile_sampling()
    with torch.no_grad():
        before = policy._compiled_sample(noise, cond)
        state = {k: v * 0.5 for k, v in policy.denoiser.state_dict().items()}
        policy.denoiser.load_state_dict(state)
        after = policy._compiled_sample(noise, cond)
        torch.testing.assert_close(after, policy.sample_with_plan(noise, cond), **CLOSE)
    assert not torch.allclose(before, after)
