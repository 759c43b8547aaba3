"""A tiny untrained Push-T keypoint policy for the RL tests (imported as tests.rl.tiny_policy)."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import DDPMScheduler

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


def make_tiny_policy(seed: int = 0) -> DiffusionPolicy:
    """A 10-step DDPM policy with a tiny UNet, normalized for Push-T's 512-pixel workspace."""
    torch.manual_seed(seed)
    policy = DiffusionPolicy(
        shape_meta=SHAPE_META,
        encoder=LowDimEncoder(SHAPE_META),
        denoiser=partial(ConditionalUnet1D, down_dims=[16, 32], step_embed_dim=16),
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=10,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            prediction_type="epsilon",
        ),
        horizon=8,
        n_obs_steps=2,
        n_action_steps=4,
    )
    policy.normalizer.fit(
        {k: torch.tensor([[0.0] * d, [512.0] * d]) for k, d in policy.normalizer.dims.items()}
    )
    return policy.eval()
