"""Reinforcement-learning fine-tuning of a trained diffusion policy (DPPO, Ren et al. 2024)."""
