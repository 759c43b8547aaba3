import functools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_policy.denoisers.unet import ConditionalUnet1D
from diffusion_policy.encoders.lowdim import LowDimEncoder
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy

SHAPE_META = {
    "obs": {
        "keypoint": {"shape": [18], "type": "low_dim"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}


def make_policy(scheduler=None, horizon=16, **kwargs) -> DiffusionPolicy:
    torch.manual_seed(0)
    scheduler = scheduler or DDPMScheduler(
        num_train_timesteps=20, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )
    return DiffusionPolicy(
        shape_meta=SHAPE_META,
        encoder=LowDimEncoder(SHAPE_META),
        denoiser=functools.partial(ConditionalUnet1D, down_dims=[32, 64], step_embed_dim=32),
        noise_scheduler=scheduler,
        horizon=horizon,
        **kwargs,
    )


def make_batch(B=8, To=2, T=16):
    g = torch.Generator().manual_seed(1)
    return {
        "obs": {
            "keypoint": torch.rand(B, To, 18, generator=g) * 512,
            "agent_pos": torch.rand(B, To, 2, generator=g) * 512,
        },
        "action": torch.rand(B, T, 2, generator=g) * 512,
    }


def fit_normalizer(policy, batch):
    policy.normalizer.fit(
        {
            "keypoint": batch["obs"]["keypoint"].reshape(-1, 18),
            "agent_pos": batch["obs"]["agent_pos"].reshape(-1, 2),
            "action": batch["action"].reshape(-1, 2),
        }
    )


def test_predict_action_shapes_and_chunk_alignment():
    policy = make_policy(n_obs_steps=2, n_action_steps=8)
    batch = make_batch(B=3)
    fit_normalizer(policy, batch)
    out = policy.predict_action(batch["obs"])
    assert out["action_pred"].shape == (3, 16, 2)
    assert out["action"].shape == (3, 8, 2)
    # The executed chunk starts at the last observed step (index n_obs_steps - 1).
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:9])
    # Clipped samples unnormalize into the action range seen in the data.
    lo, hi = batch["action"].min(), batch["action"].max()
    assert (out["action_pred"] >= lo - 1e-3).all() and (out["action_pred"] <= hi + 1e-3).all()


def test_sampling_is_reproducible_with_a_generator():
    policy = make_policy()
    batch = make_batch(B=2)
    fit_normalizer(policy, batch)
    a = policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(3))
    b = policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["action"], b["action"])


def test_other_diffusers_scheduler_and_fewer_steps():
    scheduler = DDIMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2")
    policy = make_policy(scheduler=scheduler, num_inference_steps=4)
    batch = make_batch(B=2)
    fit_normalizer(policy, batch)
    assert torch.isfinite(policy.compute_loss(batch))
    assert policy.predict_action(batch["obs"])["action"].shape == (2, 8, 2)


def test_loss_is_finite_and_falls_when_overfitting_one_batch():
    policy = make_policy()
    batch = make_batch(B=16)
    fit_normalizer(policy, batch)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(150):
        loss = policy.compute_loss(batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_bad_chunk_sizes_are_rejected():
    with pytest.raises(ValueError, match="horizon=8 is too short"):
        make_policy(horizon=8, n_obs_steps=2, n_action_steps=8)


def test_chunk_length_can_change_after_training_within_the_horizon():
    policy = make_policy(horizon=8, n_obs_steps=2, n_action_steps=1)
    batch = make_batch(B=2, T=8)
    fit_normalizer(policy, batch)
    policy.set_n_action_steps(4)
    out = policy.predict_action(batch["obs"])
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:5])
    with pytest.raises(ValueError, match="horizon=8 is too short"):
        policy.set_n_action_steps(8)
    assert policy.n_action_steps == 4


def test_encoder_rejects_unknown_key():
    with pytest.raises(KeyError, match="'image'"):
        LowDimEncoder(SHAPE_META, keys=["image"])


def test_denoiser_gets_one_condition_token_per_observation_frame():
    # The factory gets the per-frame feature size and the frame count; the denoiser gets
    # cond (B, To, F): the UNet flattens it, the transformer makes one token per frame.
    built, seen = {}, {}

    def factory(**kwargs):
        built.update(kwargs)
        net = ConditionalUnet1D(**kwargs, down_dims=[16, 32], step_embed_dim=16)
        net.register_forward_pre_hook(lambda _, args: seen.update(cond=args[2].shape))
        return net

    policy = DiffusionPolicy(
        shape_meta=SHAPE_META,
        encoder=LowDimEncoder(SHAPE_META),
        denoiser=factory,
        noise_scheduler=DDPMScheduler(num_train_timesteps=10),
        n_obs_steps=3,
        n_action_steps=4,
    )
    assert built == {"action_dim": 2, "cond_dim": 20, "n_obs_steps": 3, "horizon": 16}
    batch = make_batch(B=2, To=3)
    fit_normalizer(policy, batch)
    policy.compute_loss(batch)
    assert seen["cond"] == (2, 3, 20)


@pytest.mark.parametrize("steps", [0, -3])
def test_num_inference_steps_below_one_is_an_error(steps):
    # Before: 0 silently meant "all training steps" and -3 sampled nothing.
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps} must be >= 1"):
        make_policy(num_inference_steps=steps)
    policy = make_policy(num_inference_steps=4)
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps} must be >= 1"):
        policy.set_sampler(DDIMScheduler.from_config(policy.noise_scheduler.config), steps)
    assert policy.num_inference_steps == 4


def test_relative_actions_are_absolute_ones_moved_by_the_current_frame():
    """A policy with ``action_origin`` trains on, and samples, actions minus the current
    agent position: the same as an absolute policy on actions shifted by hand."""
    batch = make_batch(B=4)
    origin = batch["obs"]["agent_pos"][:, 1:2]  # (B, 1, 2): the current frame (To = 2)
    shifted = {**batch, "action": batch["action"] - origin}
    relative = make_policy(action_origin={"agent_pos": [0, 1]})
    absolute = make_policy()
    for policy in (relative, absolute):
        fit_normalizer(policy, shifted)
    noise = torch.randn(4, 16, 2, generator=torch.Generator().manual_seed(2))
    steps = torch.tensor([1, 5, 10, 19])
    torch.testing.assert_close(
        relative.compute_loss(batch, noise=noise, timesteps=steps),
        absolute.compute_loss(shifted, noise=noise, timesteps=steps),
    )
    out_rel = relative.predict_action(batch["obs"], generator=torch.Generator().manual_seed(3))
    out_abs = absolute.predict_action(batch["obs"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_rel["action_pred"], out_abs["action_pred"] + origin)
    assert not torch.allclose(out_rel["action_pred"], out_abs["action_pred"])


@pytest.mark.parametrize(
    "origin, match",
    [
        ({"agent_pos": [0]}, "one index"),
        ({"agent_pos": [0, 2]}, "one index"),
        ({"nope": [0, 1]}, "not a low-dim observation key"),
        ({"agent_pos": [0, 1], "keypoint": [0, 1]}, "one observation key"),
    ],
)
def test_bad_action_origin_is_refused(origin, match):
    with pytest.raises(ValueError, match=match):
        make_policy(action_origin=origin)


def test_angle_values_reach_the_encoder_unnormalized():
    # The encoder's angles are taken as observed (radians), the other values normalized.
    policy = make_policy()
    policy.encoder = LowDimEncoder(SHAPE_META, angles={"agent_pos": {1: 4}})
    batch = make_batch()
    fit_normalizer(policy, batch)
    cond = policy.encode_obs(batch["obs"])  # (B, To, 18 + 1 + 2)
    angle = batch["obs"]["agent_pos"][..., 1]
    torch.testing.assert_close(cond[..., -2], torch.cos(4 * angle))
    torch.testing.assert_close(cond[..., -1], torch.sin(4 * angle))
    x = policy.normalizer.normalize_key("agent_pos", batch["obs"]["agent_pos"])
    torch.testing.assert_close(cond[..., 18], x[..., 0])
