"""The stochastic denoising chain: its log-likelihood is the Gaussians' it samples from."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from diffusion_policy.rl.chain import DenoisingChain


def _cond(policy, B: int = 3) -> torch.Tensor:
    obs = {"keypoint": torch.rand(B, 2, 18) * 512, "agent_pos": torch.rand(B, 2, 2) * 512}
    return policy.encode_obs(obs)  # (B, To, F)


@pytest.mark.parametrize("num_steps, eta", [(None, 1.0), (5, 0.5)])
def test_log_prob_matches_torch_normal(tiny_policy, num_steps, eta):
    chain = DenoisingChain(tiny_policy, num_steps=num_steps, ft_steps=3, eta=eta, min_std=0.05)
    cond = _cond(tiny_policy)
    out = chain.sample(cond, torch.Generator().manual_seed(0))
    assert out.samples.shape == (3, 4, 8, 2)
    assert out.log_probs.shape == (3, 3)
    assert out.action.shape == (3, 8, 2)
    for j, t in enumerate(chain.ft_timesteps()):
        x, x_prev = out.samples[:, j], out.samples[:, j + 1]
        with torch.no_grad():
            mean, std = chain.gaussian(tiny_policy.denoiser, x, t.expand(3), cond)
        expected = Normal(mean, std.expand_as(mean)).log_prob(x_prev).sum((1, 2))  # (B,)
        torch.testing.assert_close(out.log_probs[:, j], expected)
    # Recomputing the whole chain's log-likelihood under the same weights gives it again.
    with torch.no_grad():
        torch.testing.assert_close(chain.chain_log_prob(out.samples, cond), out.log_probs)


def test_ddpm_step_is_the_posterior_and_std_is_clipped(tiny_policy):
    chain = DenoisingChain(tiny_policy, ft_steps=10, eta=1.0, min_std=0.07)
    alphas = tiny_policy.noise_scheduler.alphas_cumprod
    t = torch.tensor([5, 0])
    x = torch.randn(2, 8, 2)
    with torch.no_grad():
        _, std = chain.gaussian(tiny_policy.denoiser, x, t, _cond(tiny_policy, 2))
    a_t, a_prev = alphas[5], alphas[4]
    posterior = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    torch.testing.assert_close(std[0].squeeze(), torch.maximum(posterior, torch.tensor(0.07)))
    torch.testing.assert_close(std[1].squeeze(), torch.tensor(0.07))  # last step: sigma = 0


def test_same_generator_same_chain(tiny_policy):
    chain = DenoisingChain(tiny_policy, ft_steps=2)
    cond = _cond(tiny_policy)
    a = chain.sample(cond, torch.Generator().manual_seed(3))
    b = chain.sample(cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.samples, b.samples)


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"ft_steps": 11}, "ft_steps=11"), ({"eta": 0.0}, "eta=0.0"), ({"min_std": 0}, "min_std=0")],
)
def test_bad_settings_are_named(tiny_policy, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        DenoisingChain(tiny_policy, **kwargs)
