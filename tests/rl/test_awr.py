"""The AWR update fits the denoiser to its samples in proportion to their advantages."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.rl.awr import AWRConfig, awr_update, awr_weights
from diffusion_policy.rl.chain import DenoisingChain
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.ppo import PPOBatch


def _setup(policy, lr: float = 1e-3):
    chain = DenoisingChain(policy, ft_steps=3, min_std=0.1)
    obs = {"keypoint": torch.rand(8, 2, 18) * 512, "agent_pos": torch.rand(8, 2, 2) * 512}
    cond = policy.encode_obs(obs)  # (8, To, F)
    out = chain.sample(cond, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0] * 4)  # even decisions good, odd ones bad
    batch = PPOBatch(cond, torch.linspace(0, 0.9, 8), out.samples, out.log_probs, adv, adv)
    critic = ValueMLP(cond[0].numel(), [16])
    actor_opt = torch.optim.Adam(policy.denoiser.parameters(), lr=lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=lr)
    return critic, actor_opt, critic_opt, batch


def _errors(policy, batch) -> torch.Tensor:
    """Each decision's denoising error of its sample, averaged over fixed noises and steps."""
    gen = torch.Generator().manual_seed(1)
    x0 = batch.samples[:, -1].clamp(-1, 1)
    total = torch.zeros(len(x0))
    with torch.no_grad():
        for t in range(policy.num_train_timesteps):
            noise = torch.randn(x0.shape, generator=gen)
            steps = torch.full((len(x0),), t)
            total += policy.denoising_error(x0, batch.cond, noise, steps)
    return total


def test_weights_grow_with_the_advantage_and_are_clipped():
    adv = torch.tensor([-2.0, -1.0, 0.0, 1.0, 10.0])
    w = awr_weights(adv, beta=0.5, max_weight=5.0)
    assert torch.all(w[1:] >= w[:-1]) and w[0] < w[2] < w[3]
    assert w.max() == 5.0 and torch.all(w > 0)
    # Normalized over the batch: a shift or a scale of the advantages changes nothing.
    torch.testing.assert_close(awr_weights(3 * adv + 7, 0.5, 5.0), w)


def test_update_fits_good_samples_better_than_bad_ones(tiny_policy):
    critic, actor_opt, critic_opt, batch = _setup(tiny_policy, lr=1e-3)
    before = _errors(tiny_policy, batch)
    cfg = AWRConfig(epochs=30, minibatch_size=8, beta=0.2)
    metrics = awr_update(
        tiny_policy, critic, actor_opt, critic_opt, batch, cfg, torch.Generator().manual_seed(0)
    )
    change = _errors(tiny_policy, batch) - before
    # Weighted 1 : exp(-10): the good samples' error falls by more than the bad ones'.
    assert change[0::2].mean() < 0, change
    assert change[0::2].mean() < change[1::2].mean(), change
    assert metrics["n_skipped"] == 0 and metrics["awr_loss"] > 0
    assert 0.4 < metrics["weight_ess"] < 0.6  # half the batch carries the weight


def test_critic_warmup_and_zero_epochs_leave_the_policy_unchanged(tiny_policy):
    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    for epochs, train_actor in ((2, False), (0, True)):
        critic, actor_opt, critic_opt, batch = _setup(tiny_policy)
        cfg = AWRConfig(epochs=epochs, minibatch_size=4)
        metrics = awr_update(
            tiny_policy, critic, actor_opt, critic_opt, batch, cfg, train_actor=train_actor
        )
        for k, v in tiny_policy.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert metrics["n_skipped"] == 0


def test_nonfinite_minibatch_is_skipped(tiny_policy):
    critic, actor_opt, critic_opt, batch = _setup(tiny_policy)
    batch.cond[0] = float("nan")
    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    metrics = awr_update(tiny_policy, critic, actor_opt, critic_opt, batch, AWRConfig(epochs=1))
    assert metrics["n_skipped"] == 1
    for k, v in tiny_policy.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize(("key", "value"), [("beta", 0.0), ("max_weight", -1.0), ("epochs", -1)])
def test_bad_settings_are_named(key, value):
    with pytest.raises(ValueError, match=f"awr.{key}"):
        AWRConfig(**{key: value})
