"""Off-policy steering: the replay buffer's transitions and what SAC's updates learn."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.rl.rollouts import Rollout
from diffusion_policy.rl.sac import ReplayBuffer, SACConfig, SoftActorCritic


def _rollout() -> Rollout:
    """3 decisions in 2 envs: env 0 ends at its 2nd decision, env 1 runs past the 3rd."""
    N, E = 3, 2
    cond = torch.arange(N * E, dtype=torch.float32).view(N, E, 1, 1).expand(N, E, 2, 3)
    return Rollout(
        cond=cond.clone(),
        elapsed=torch.rand(N, E),
        samples=torch.randn(N, E, 2, 4, 2),
        log_probs=torch.zeros(N, E, 1),
        values=torch.zeros(N, E),
        rewards=torch.arange(N * E, dtype=torch.float32).view(N, E),
        dones=torch.tensor([[False, False], [True, False], [False, False]]),
        valid=torch.tensor([[True, True], [True, True], [False, True]]),
        last_values=torch.zeros(E),
    )


def test_buffer_pairs_each_decision_with_the_next_one_of_its_env():
    rollout = _rollout()
    buffer = ReplayBuffer(10, (2, 3), (4, 2))
    # Kept: env 0's two decisions (the 2nd ended), env 1's first two; env 1's last decision
    # has no next observation and did not end.
    assert buffer.add_rollout(rollout, reward_scale=0.5) == 4
    data = {k: v[: len(buffer)] for k, v in buffer.data.items()}
    ids = data["cond"][:, 0, 0].long()  # decision n of env e has id 2n + e
    assert sorted(ids.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(data["next_cond"][:, 0, 0].long(), ids + 2)
    torch.testing.assert_close(data["reward"], ids.float() * 0.5)
    torch.testing.assert_close(data["done"], (ids == 2).float())
    n, e = ids // 2, ids % 2
    torch.testing.assert_close(data["w"], rollout.samples[n, e, -1])
    torch.testing.assert_close(data["next_elapsed"], rollout.elapsed[n + 1, e])


def test_buffer_overwrites_the_oldest_decisions_and_round_trips():
    buffer = ReplayBuffer(6, (2, 3), (4, 2))
    for _ in range(2):
        buffer.add_rollout(_rollout())
    assert len(buffer) == 6 and buffer.pos == 2
    copy = ReplayBuffer(6, (2, 3), (4, 2))
    copy.load_state_dict(buffer.state_dict())
    for key, value in buffer.data.items():
        assert torch.equal(copy.data[key], value), key
    with pytest.raises(ValueError, match="buffer_size=4"):
        ReplayBuffer(4, (2, 3), (4, 2)).load_state_dict(buffer.state_dict())


def test_sac_steers_the_noise_toward_what_paid():
    """One-decision episodes that pay the sum of the noise: Q learns it, the mean follows."""
    torch.manual_seed(0)
    policy = NoisePolicy(6, 4, 2, [32])
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    cfg = SACConfig(batch_size=64, init_alpha=1e-3, q_lr=3e-3)
    sac = SoftActorCritic(policy, opt, 6, cfg, gamma=0.99, hidden_dims=[64])
    N, E = 1, 256
    w = torch.randn(N, E, 4, 2)
    rollout = Rollout(
        cond=torch.randn(N, E, 2, 3),
        elapsed=torch.zeros(N, E),
        samples=torch.stack([torch.zeros_like(w), w], 2),
        log_probs=torch.zeros(N, E, 1),
        values=torch.zeros(N, E),
        rewards=w.sum((2, 3)),
        dones=torch.ones(N, E, dtype=torch.bool),
        valid=torch.ones(N, E, dtype=torch.bool),
        last_values=torch.zeros(E),
    )
    assert sac.add(rollout, reward_scale=1.0) == E
    gen = torch.Generator().manual_seed(0)
    sac.update(200, gen, train_actor=False)
    with torch.no_grad():  # Q fits the one-step returns
        q = sac.q(rollout.cond[0], rollout.elapsed[0], w[0])
    assert torch.corrcoef(torch.stack([q[0], rollout.rewards[0]]))[0, 1] > 0.9
    stats = sac.update(100, gen)
    with torch.no_grad():
        mean, _ = policy(rollout.cond[0])
    assert mean.mean() > 0.2, mean.mean()  # moved from 0 toward larger noise
    assert stats["n_skipped"] == 0 and {"actor_loss", "alpha", "entropy"} <= stats.keys()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sac.target_std=0"):
        SACConfig(target_std=0)
    with pytest.raises(ValueError, match="sac.batch_size=0"):
        SACConfig(batch_size=0)
