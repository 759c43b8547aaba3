import pytest
import torch

from diffusion_policy.denoisers.temporal_conv import set_conv_path
from diffusion_policy.denoisers.unet import ConditionalUnet1D


def test_output_shape_matches_input():
    net = ConditionalUnet1D(action_dim=2, cond_dim=40, horizon=16, down_dims=[32, 64, 128])
    x = torch.randn(3, 16, 2)  # (B, T, Da)
    out = net(x, torch.tensor([0, 5, 99]), torch.randn(3, 40))
    assert out.shape == (3, 16, 2)
    assert torch.isfinite(out).all()


def test_scalar_timestep_broadcasts():
    net = ConditionalUnet1D(action_dim=2, cond_dim=4, horizon=8, down_dims=[16, 32])
    x, cond = torch.randn(2, 8, 2), torch.randn(2, 4)
    a = net(x, torch.tensor(7), cond)
    b = net(x, torch.tensor([7, 7]), cond)
    torch.testing.assert_close(a, b)


def test_condition_changes_output():
    torch.manual_seed(0)
    net = ConditionalUnet1D(action_dim=2, cond_dim=4, horizon=8, down_dims=[16, 32])
    x = torch.randn(1, 8, 2)
    a = net(x, torch.tensor([3]), torch.zeros(1, 4))
    b = net(x, torch.tensor([3]), torch.ones(1, 4))
    c = net(x, torch.tensor([50]), torch.zeros(1, 4))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)


def test_paper_keypoint_size():
    # The paper's Push-T keypoint UNet: 20-D obs x 2 frames, down_dims [256, 512, 1024].
    net = ConditionalUnet1D(action_dim=2, cond_dim=40, horizon=16)
    n_params = sum(p.numel() for p in net.parameters())
    assert 65e6 < n_params < 67e6


def test_horizon_mismatch_is_caught_at_construction():
    with pytest.raises(ValueError, match=r"horizon=10 must be a multiple of 4"):
        ConditionalUnet1D(action_dim=2, cond_dim=4, horizon=10, down_dims=[16, 32, 64])


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="n_groups=8"):
        ConditionalUnet1D(action_dim=2, cond_dim=4, horizon=8, down_dims=[12, 24])


def test_every_block_gets_its_own_film():
    # forward() hands each block a slice of film_condition's output: it must be that block's
    # FiLM of the condition (checkpoints store the FiLM weights per block).
    torch.manual_seed(0)
    net = ConditionalUnet1D(action_dim=2, cond_dim=4, horizon=8, down_dims=[16, 32, 32])
    t, cond = torch.tensor([3, 70]), torch.randn(2, 4)
    c = torch.cat([net.step_encoder(t), cond], dim=-1)
    seen = {}
    for block in net.film_blocks:
        block.register_forward_hook(lambda m, args, out: seen.__setitem__(m, args[1]))
    net(torch.randn(2, 8, 2), t, cond)
    assert len(seen) == len(net.film_blocks) == 12  # down 3 x 2, mid 2, up 2 x 2
    for block, film in seen.items():
        torch.testing.assert_close(film, block.film(c))


@pytest.mark.slow
def test_compiled_bf16_training_step_matches_eager():
    """What `trainer.compile=true` runs where `precision=auto` picks bf16: a compiled step on
    the GEMM path. A variant with the 1x1 layers on that path crashed the process here (heap
    corruption), so the step must run and match eager.
    """
    set_conv_path("gemm")
    try:
        torch.manual_seed(0)
        unet = ConditionalUnet1D(2, 20, 16, n_obs_steps=2, down_dims=[32, 64, 128])
        x, t, cond = torch.randn(8, 16, 2), torch.randint(0, 100, (8,)), torch.randn(8, 2, 20)
        grads = []
        for model in (unet, torch.compile(unet, dynamic=False)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, t, cond).float().square().mean()
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
            unet.zero_grad(set_to_none=True)
        torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.05 * grads[0].abs().max())
    finally:
        set_conv_path(None)
