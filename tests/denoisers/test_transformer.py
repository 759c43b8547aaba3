import pytest
import torch

from diffusion_policy.denoisers.transformer import DiffusionTransformer


def make(**kwargs) -> DiffusionTransformer:
    torch.manual_seed(0)
    args = dict(action_dim=2, cond_dim=5, horizon=8, n_obs_steps=2, n_layer=2, n_head=2, n_emb=16)
    return DiffusionTransformer(**{**args, **kwargs}).eval()


def test_output_shape_matches_input():
    net = make()
    out = net(torch.randn(3, 8, 2), torch.tensor([0, 5, 99]), torch.randn(3, 2, 5))
    assert out.shape == (3, 8, 2)
    assert torch.isfinite(out).all()


def test_scalar_timestep_broadcasts():
    net = make()
    x, cond = torch.randn(2, 8, 2), torch.randn(2, 2, 5)
    torch.testing.assert_close(net(x, torch.tensor(7), cond), net(x, torch.tensor([7, 7]), cond))


def test_step_and_condition_change_output():
    net = make()
    x = torch.randn(1, 8, 2)
    a = net(x, torch.tensor([3]), torch.zeros(1, 2, 5))
    assert not torch.allclose(a, net(x, torch.tensor([3]), torch.ones(1, 2, 5)))
    assert not torch.allclose(a, net(x, torch.tensor([50]), torch.zeros(1, 2, 5)))


@pytest.mark.parametrize("n_cond_layers", [0, 1])
def test_causal_mask_hides_later_action_tokens(n_cond_layers):
    net = make(n_cond_layers=n_cond_layers)
    x, t, cond = torch.randn(2, 8, 2), torch.tensor([4, 9]), torch.randn(2, 2, 5)
    k = 5
    x_later = x.clone()
    x_later[:, k:] += torch.randn(2, 8 - k, 2)  # perturb tokens k..T-1 only
    a, b = net(x, t, cond), net(x_later, t, cond)
    torch.testing.assert_close(a[:, :k], b[:, :k])  # earlier outputs are untouched
    assert not torch.allclose(a[:, k:], b[:, k:])


def test_action_token_sees_no_later_observation_frame():
    # Action token 0 is aligned with observation frame 0: frame 1 must not reach it.
    net = make()
    x, t, cond = torch.randn(2, 8, 2), torch.tensor([4, 9]), torch.randn(2, 2, 5)
    cond_later = cond.clone()
    cond_later[:, 1] += 1.0
    a, b = net(x, t, cond), net(x, t, cond_later)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_non_causal_attention_sees_later_tokens():
    net = make(causal_attn=False)
    x, t, cond = torch.randn(1, 8, 2), torch.tensor([4]), torch.randn(1, 2, 5)
    x_later = x.clone()
    x_later[:, -1] += 1.0
    assert not torch.allclose(net(x, t, cond)[:, 0], net(x_later, t, cond)[:, 0])


def test_masks_are_not_saved_in_the_state_dict():
    assert not any("mask" in k for k in make().state_dict())


def test_paper_keypoint_size():
    # The paper's DP-T for Push-T keypoints: 8 layers, 4 heads, 256-wide; about 9M parameters.
    net = DiffusionTransformer(action_dim=2, cond_dim=20, horizon=16, n_obs_steps=2)
    n_params = sum(p.numel() for p in net.parameters())
    assert 8.5e6 < n_params < 9.5e6


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="n_emb=10 must be divisible by n_head=4"):
        DiffusionTransformer(action_dim=2, cond_dim=4, horizon=8, n_emb=10, n_head=4)
    with pytest.raises(ValueError, match=r"expected 8 action tokens and 2 observation frames"):
        make()(torch.randn(1, 8, 2), torch.tensor([1]), torch.randn(1, 3, 5))
