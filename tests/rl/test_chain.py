"""The stochastic denoising chain: its log-likelihood is the Gaussians' it samples from."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from diffusion_policy.rl.chain import DenoisingChain, ddim_config


def _cond(policy, B: int = 3) -> torch.Tensor:
    obs = {"keypoint": torch.rand(B, 2, 18) * 512, "agent_pos": torch.rand(B, 2, 2) * 512}
    return policy.encode_obs(obs)  # (B, To, F)


@pytest.mark.parametrize(
    "num_steps, eta, logprob_min_std, log_prob",
    [(None, 1.0, None, "sum"), (5, 0.5, 0.1, "sum"), (5, 0.5, 0.1, "executed_mean")],
)
def test_log_prob_matches_torch_normal(tiny_policy, num_steps, eta, logprob_min_std, log_prob):
    chain = DenoisingChain(
        tiny_policy,
        num_steps=num_steps,
        ft_steps=3,
        eta=eta,
        min_std=0.05,
        logprob_min_std=logprob_min_std,
        log_prob=log_prob,
    )
    # "executed_mean" scores the actions predict_action executes: from the last observed step.
    start = tiny_policy.n_obs_steps - 1
    executed = slice(start, start + tiny_policy.n_action_steps)
    cond = _cond(tiny_policy)
    out = chain.sample(cond, torch.Generator().manual_seed(0))
    assert out.samples.shape == (3, 4, 8, 2)
    assert out.log_probs.shape == (3, 3)
    assert out.action.shape == (3, 8, 2)
    for j, t in enumerate(chain.ft_timesteps()):
        x, x_prev = out.samples[:, j], out.samples[:, j + 1]
        with torch.no_grad():
            mean, sigma = chain.gaussian(tiny_policy.denoiser, x, t.expand(3), cond)
        std = sigma.clamp_min(logprob_min_std or 0.05)
        per_element = Normal(mean, std.expand_as(mean)).log_prob(x_prev)  # (B, T, Da)
        if log_prob == "sum":
            expected = per_element.sum((1, 2))  # (B,)
        else:
            expected = per_element[:, executed].mean((1, 2))
        torch.testing.assert_close(out.log_probs[:, j], expected)
    # Recomputing the whole chain's log-likelihood under the same weights gives it again.
    with torch.no_grad():
        torch.testing.assert_close(chain.chain_log_prob(out.samples, cond), out.log_probs)


def test_ddpm_step_is_the_posterior_and_std_is_clipped(tiny_policy):
    chain = DenoisingChain(tiny_policy, ft_steps=10, eta=1.0, min_std=0.07, logprob_min_std=0.2)
    alphas = tiny_policy.noise_scheduler.alphas_cumprod
    t = torch.tensor([5, 0])
    x = torch.randn(2, 8, 2)
    cond = _cond(tiny_policy, 2)
    with torch.no_grad():
        _, sigma = chain.gaussian(tiny_policy.denoiser, x, t, cond)
        _, _, std = chain.step_log_prob(x, t, x, cond)
    a_t, a_prev = alphas[5], alphas[4]
    posterior = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    torch.testing.assert_close(sigma[0].squeeze(), posterior)
    torch.testing.assert_close(sigma[1].squeeze(), torch.tensor(0.0))  # last step: sigma = 0
    torch.testing.assert_close(std[0].squeeze(), torch.maximum(posterior, torch.tensor(0.2)))
    torch.testing.assert_close(std[1].squeeze(), torch.tensor(0.2))
    # Sampling explores with min_std: the last step's spread is 0.07, not 0.2.
    samples = chain.sample(cond, torch.Generator().manual_seed(0)).samples  # (2, 11, T, Da)
    with torch.no_grad():
        mean, _ = chain.gaussian(tiny_policy.denoiser, samples[:, -2], torch.tensor([0, 0]), cond)
    spread = (samples[:, -1] - mean).std()
    assert 0.05 < spread < 0.1, spread


def test_same_generator_same_chain(tiny_policy):
    chain = DenoisingChain(tiny_policy, ft_steps=2)
    cond = _cond(tiny_policy)
    a = chain.sample(cond, torch.Generator().manual_seed(3))
    b = chain.sample(cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.samples, b.samples)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"ft_steps": 11}, "ft_steps=11"),
        ({"eta": 0.0}, "eta=0.0"),
        ({"min_std": 0}, "min_std=0"),
        ({"log_prob": "mean"}, "log_prob='mean'"),
    ],
)
def test_bad_settings_are_named(tiny_policy, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        DenoisingChain(tiny_policy, **kwargs)


def test_thresholding_sampler_clamps_the_clean_sample_as_clip_sample_does(tiny_policy):
    """A DPM-Solver policy (thresholding, no clip_sample) keeps x0 in [-1, 1] in the chain too:
    unclamped, the noisiest step's x0 = (x - sqrt(1 - a) eps) / sqrt(a) explodes."""
    from diffusers import DPMSolverMultistepScheduler

    config = dict(tiny_policy.noise_scheduler.config)
    config.pop("clip_sample")
    tiny_policy.noise_scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=config["num_train_timesteps"],
        beta_schedule=config["beta_schedule"],
        thresholding=True,
        sample_max_value=1.0,
    )
    chain = DenoisingChain(tiny_policy, ft_steps=10, min_std=0.05)
    assert chain.clip == 1.0
    x = torch.randn(3, 8, 2) * 5
    t = torch.full((3,), 9)
    cond = _cond(tiny_policy)
    with torch.no_grad():
        mean, _ = chain.gaussian(tiny_policy.denoiser, x, t, cond)
    # mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps with |x0| <= 1
    a = tiny_policy.noise_scheduler.alphas_cumprod
    a_t, a_prev = a[9], a[8]
    eps = tiny_policy.denoiser(x, t, cond)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    assert x0.abs().max() > 1.0  # the case the clamp is for
    x0 = x0.clamp(-1, 1)
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    torch.testing.assert_close(mean, expected.detach())


def test_ddim_config_samples_the_chain_without_its_noise(tiny_policy):
    from diffusion_policy.training.sampling import sampling_scheduler

    chain = DenoisingChain(tiny_policy, num_steps=5, ft_steps=5, eta=1e-6, min_std=0.05)
    trained = dict(tiny_policy.noise_scheduler.config)
    tiny_policy.set_sampler(sampling_scheduler(trained, ddim_config(tiny_policy)), chain.num_steps)
    obs = {"keypoint": torch.rand(2, 2, 18) * 512, "agent_pos": torch.rand(2, 2, 2) * 512}
    got = tiny_policy.predict_action(obs, generator=torch.Generator().manual_seed(4))
    assert list(tiny_policy.sampler_plan().timesteps) == chain.timesteps.tolist()

    cond = tiny_policy.encode_obs(obs)
    x = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for t in chain.timesteps:
            x, _ = chain.gaussian(tiny_policy.denoiser, x, t.expand(2), cond)  # the mean: no noise
    # Compared normalized: float32 round-off differs (the policy computes every step's FiLM in
    # one batched product, the chain per step), and the noisiest step divides it by
    # sqrt(alpha_bar), about 1/100; a wrong step would be off by 1e-2 or more.
    got_normalized = tiny_policy.normalizer.normalize_key("action", got["action_pred"])
    torch.testing.assert_close(got_normalized, x.clamp(-1, 1), atol=5e-4, rtol=0)
