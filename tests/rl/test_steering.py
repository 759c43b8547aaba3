"""Latent-noise steering: the sampler runs from the drawn noise, and PPO moves its density."""

from __future__ import annotations

import torch
from torch.distributions import Normal, kl_divergence

from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.ppo import PPOBatch, PPOConfig, ppo_update
from diffusion_policy.rl.steering import NoiseSteering

OBS = {"keypoint": torch.rand(8, 2, 18) * 512, "agent_pos": torch.rand(8, 2, 2) * 512}


def _steering(policy) -> NoiseSteering:
    cond_dim = policy.n_obs_steps * policy.encoder.output_dim
    policy.noise_policy = NoisePolicy(cond_dim, policy.horizon, policy.action_dim, [16])
    return NoiseSteering(policy)


def test_sample_denoises_the_drawn_noise_and_scores_it(tiny_policy):
    steering = _steering(tiny_policy)
    cond = tiny_policy.encode_obs(OBS)
    out = steering.sample(cond, torch.Generator().manual_seed(0))
    w = out.samples[:, 1]  # (B, T, Da)
    assert out.samples.shape == (8, 2, 8, 2) and out.log_probs.shape == (8, 1)
    # Untrained: w is N(0, I), so its density is the standard normal's.
    torch.testing.assert_close(out.log_probs[:, 0], Normal(0.0, 1.0).log_prob(w).sum((1, 2)))
    # The action is the policy's sampler (DDPM here, which draws noise too) run from w.
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(tiny_policy.initial_noise(cond, gen), w)
    x = tiny_policy.denoise(w, cond, gen)
    torch.testing.assert_close(out.action, tiny_policy.actions_from_sample(x)["action_pred"])


def test_ppo_raises_good_and_lowers_bad_noise_likelihoods(tiny_policy):
    steering = _steering(tiny_policy)
    noise_policy = tiny_policy.noise_policy
    cond = tiny_policy.encode_obs(OBS)
    out = steering.sample(cond, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0] * 4)
    batch = PPOBatch(cond, torch.zeros(8), out.samples, out.log_probs, adv, torch.zeros(8))
    critic = ValueMLP(cond[0].numel(), [16])
    actor_opt = torch.optim.Adam(noise_policy.parameters(), lr=1e-2)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    denoiser = {k: v.clone() for k, v in tiny_policy.denoiser.state_dict().items()}
    cfg = PPOConfig(epochs=4, minibatch_size=4, clip_ratio=0.2, norm_adv=False)
    metrics = ppo_update(steering, critic, actor_opt, critic_opt, batch, cfg, torch.Generator())
    with torch.no_grad():
        change = noise_policy.log_prob(out.samples[:, 1], cond)[0] - out.log_probs[:, 0]
    assert change[0::2].mean() > 0, change
    assert change[1::2].mean() < 0, change
    assert metrics["n_skipped"] == 0 and metrics["approx_kl"] > 0
    for key, value in tiny_policy.denoiser.state_dict().items():  # the denoiser stays frozen
        assert torch.equal(value, denoiser[key]), key


def test_kl_to_base_is_the_gaussian_kl_to_the_standard_normal(tiny_policy):
    steering = _steering(tiny_policy)
    mean, std = torch.randn(3, 8, 2), torch.rand(8, 2) + 0.5
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(0.0, 1.0)).sum((1, 2))
    kl = steering.kl_to_base(None, None, None, mean, std)
    torch.testing.assert_close(kl, expected.mean())
    zero = steering.kl_to_base(None, None, None, torch.zeros(3, 8, 2), torch.ones(8, 2))
    assert zero == 0
