"""The PPO update moves chain likelihoods in the direction of their advantages."""

from __future__ import annotations

import torch

from diffusion_policy.rl.chain import DenoisingChain
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.ppo import PPOBatch, PPOConfig, ppo_update


def _setup(policy, lr: float = 1e-3):
    chain = DenoisingChain(policy, ft_steps=3, min_std=0.1)
    obs = {"keypoint": torch.rand(8, 2, 18) * 512, "agent_pos": torch.rand(8, 2, 2) * 512}
    cond = policy.encode_obs(obs)  # (8, To, F)
    out = chain.sample(cond, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0] * 4)  # even decisions good, odd ones bad
    elapsed = torch.linspace(0, 0.9, 8)
    batch = PPOBatch(cond, elapsed, out.samples, out.log_probs, adv, torch.zeros(8))
    critic = ValueMLP(cond[0].numel(), [16])
    actor_opt = torch.optim.Adam(policy.denoiser.parameters(), lr=lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=lr)
    return chain, critic, actor_opt, critic_opt, batch


def test_update_raises_good_and_lowers_bad_likelihoods(tiny_policy):
    chain, critic, actor_opt, critic_opt, batch = _setup(tiny_policy, lr=3e-4)
    cfg = PPOConfig(epochs=4, minibatch_size=6, clip_ratio=0.2, norm_adv=False)
    metrics = ppo_update(chain, critic, actor_opt, critic_opt, batch, cfg, torch.Generator())
    with torch.no_grad():
        change = (chain.chain_log_prob(batch.samples, batch.cond) - batch.log_probs).sum(1)
    # One small network serves every decision, so single chunks may move against their sign;
    # the groups move as their advantages say.
    assert change[0::2].mean() > 0, change
    assert change[1::2].mean() < 0, change
    assert metrics["n_skipped"] == 0
    for key in ("pg_loss", "value_loss", "approx_kl", "clip_frac", "log_std"):
        assert key in metrics


def test_zero_lr_or_zero_epochs_leave_the_policy_unchanged(tiny_policy):
    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    for lr, epochs in ((0.0, 2), (1e-3, 0)):
        chain, critic, actor_opt, critic_opt, batch = _setup(tiny_policy, lr=lr)
        ppo_update(chain, critic, actor_opt, critic_opt, batch, PPOConfig(epochs=epochs))
        for k, v in tiny_policy.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_nonfinite_minibatch_is_skipped(tiny_policy):
    chain, critic, actor_opt, critic_opt, batch = _setup(tiny_policy)
    batch.log_probs[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    cfg = PPOConfig(epochs=1, minibatch_size=1000)  # one minibatch, holding the NaN
    metrics = ppo_update(chain, critic, actor_opt, critic_opt, batch, cfg)
    assert metrics["n_skipped"] == 1
    for k, v in tiny_policy.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_critic_warmup_trains_only_the_critic(tiny_policy):
    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    chain, critic, actor_opt, critic_opt, batch = _setup(tiny_policy, lr=3e-4)
    batch.returns = torch.ones(8)
    critic_before = [p.clone() for p in critic.parameters()]
    cfg = PPOConfig(epochs=2, minibatch_size=6)
    metrics = ppo_update(chain, critic, actor_opt, critic_opt, batch, cfg, train_actor=False)
    for k, v in tiny_policy.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # The denoiser did not even run backward: a warm-up costs the critic's step alone.
    assert all(p.grad is None for p in tiny_policy.denoiser.parameters())
    assert metrics["value_loss"] > 0 and "pg_loss" not in metrics
    assert any(
        not torch.equal(a, b) for a, b in zip(critic_before, critic.parameters(), strict=True)
    )
