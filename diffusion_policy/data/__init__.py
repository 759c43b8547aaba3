"""Data layer: zarr replay buffer, sequence sampler, episode split, normalizer, datasets.

Modules are imported directly (``from diffusion_policy.data.replay_buffer import ReplayBuffer``)
so that light users, like the download script, do not import torch.
"""
