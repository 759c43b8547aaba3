"""Residual RL: the env executes the sampled chunk plus a scored correction; PPO moves it."""

from __future__ import annotations

import torch
from torch.distributions import Normal, kl_divergence

from diffusion_policy.policies.residual_policy import ResidualPolicy
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.ppo import PPOBatch, PPOConfig, ppo_update
from diffusion_policy.rl.residual import ResidualActor

OBS = {"keypoint": torch.rand(8, 2, 18) * 512, "agent_pos": torch.rand(8, 2, 2) * 512}


def _actor(policy) -> ResidualActor:
    cond_dim = policy.n_obs_steps * policy.encoder.output_dim
    policy.residual_policy = ResidualPolicy(
        cond_dim, policy.horizon, policy.action_dim, 1, policy.n_action_steps, [16], 0.05
    )
    return ResidualActor(policy)


def test_sample_corrects_the_policys_own_chunk_and_scores_the_correction(tiny_policy):
    actor = _actor(tiny_policy)
    cond = tiny_policy.encode_obs(OBS)
    out = actor.sample(cond, torch.Generator().manual_seed(0))
    x, delta = out.samples[:, 0], out.samples[:, 1]  # (B, T, Da) each
    assert out.samples.shape == (8, 2, 8, 2) and out.log_probs.shape == (8, 1)
    gen = torch.Generator().manual_seed(0)
    base = tiny_policy.denoise(tiny_policy.initial_noise(cond, gen), cond, gen)
    assert torch.equal(x, base)  # the chunk is the policy's own sample
    assert delta[:, 1:5].abs().max() > 0 and (delta[:, 0] == 0).all()  # executed rows only
    expected = tiny_policy.actions_from_sample(x + delta)["action_pred"]
    torch.testing.assert_close(out.action, expected)
    log_prob, _, _ = actor.step_log_prob(x, torch.zeros(8), delta, cond)
    torch.testing.assert_close(out.log_probs[:, 0], log_prob)


def test_ppo_raises_good_and_lowers_bad_correction_likelihoods(tiny_policy):
    actor = _actor(tiny_policy)
    residual = tiny_policy.residual_policy
    cond = tiny_policy.encode_obs(OBS)
    out = actor.sample(cond, torch.Generator().manual_seed(0))
    critic = ValueMLP(cond[0].numel(), [16])
    advantages = torch.tensor([1.0, -1.0] * 4)
    batch = PPOBatch(cond, torch.zeros(8), out.samples, out.log_probs, advantages, advantages)
    opt = torch.optim.Adam(residual.parameters(), lr=1e-2)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    cfg = PPOConfig(epochs=5, minibatch_size=8, clip_ratio=0.2)
    ppo_update(actor, critic, opt, critic_opt, batch, cfg, torch.Generator().manual_seed(0))
    x, delta = out.samples[:, 0], out.samples[:, 1]
    after, _, _ = residual.log_prob(delta, cond, x)
    change = after - out.log_probs[:, 0]
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tiny_policy.denoiser.parameters())


def test_kl_to_base_is_the_gaussian_kl_to_no_correction(tiny_policy):
    actor = _actor(tiny_policy)  # init_std 0.05
    mean, std = torch.randn(3, 4, 2) * 0.05, torch.rand(4, 2) * 0.1 + 0.01
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(0.0, 0.05))
    kl = actor.kl_to_base(None, None, None, mean, std)
    torch.testing.assert_close(kl, expected.flatten(1).sum(1).mean())
