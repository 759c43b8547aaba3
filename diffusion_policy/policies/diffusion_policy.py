"""The diffusion policy: observation encoder + denoiser + diffusers noise scheduler + normalizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from torch import nn

from diffusion_policy.data.normalizer import LinearNormalizer

ACTION = "action"


class DiffusionPolicy(nn.Module):
    """Predicts a chunk of actions by iteratively denoising Gaussian noise.

    The observation of the last ``n_obs_steps`` frames is encoded once into a global condition;
    the denoiser predicts the noise (or the clean actions) of a ``horizon``-long action sequence.
    Of the predicted horizon, the ``n_action_steps`` actions starting at the last observed step
    are the ones executed.

    Args:
        shape_meta: The dataset's shape description (observation keys with shapes and types,
            and the action shape).
        encoder: Maps normalized observations {key: (B, To, ...)} to (B, To, encoder.output_dim).
        denoiser: Factory ``denoiser(action_dim=, cond_dim=, horizon=)`` returning the network,
            e.g. a ``functools.partial`` of :class:`ConditionalUnet1D` made by Hydra.
        noise_scheduler: A diffusers scheduler (DDPM, DDIM, DPM-Solver, ...).
        horizon: Length of the predicted action sequence.
        n_obs_steps: Number of observation frames conditioning the prediction.
        n_action_steps: Number of actions executed per prediction.
        num_inference_steps: Denoising steps when sampling; the scheduler's training steps if None.
    """

    def __init__(
        self,
        shape_meta: Mapping[str, Any],
        encoder: nn.Module,
        denoiser: Callable[..., nn.Module],
        noise_scheduler: SchedulerMixin,
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        num_inference_steps: int | None = None,
    ) -> None:
        super().__init__()
        if n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError(
                f"n_obs_steps={n_obs_steps} and n_action_steps={n_action_steps} must be >= 1"
            )
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ValueError(
                f"horizon={horizon} is too short for n_obs_steps={n_obs_steps} and "
                f"n_action_steps={n_action_steps}: needs at least n_obs_steps - 1 + n_action_steps"
            )
        self.shape_meta = shape_meta
        self.action_dim = int(shape_meta[ACTION]["shape"][0])
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps

        self.encoder = encoder
        self.denoiser = denoiser(
            action_dim=self.action_dim,
            cond_dim=encoder.output_dim * n_obs_steps,
            horizon=horizon,
        )
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps or self.num_train_timesteps

        low_dim = {
            k: int(torch.Size(m["shape"]).numel())
            for k, m in shape_meta["obs"].items()
            if m.get("type", "low_dim") == "low_dim"
        }
        self.normalizer = LinearNormalizer({**low_dim, ACTION: self.action_dim})

    # ----------------------------------------------------------------------------------------
    def _normalize_obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalizes the low-dim keys and keeps the first n_obs_steps frames of each key."""
        out = {}
        for key, value in obs.items():
            value = value[:, : self.n_obs_steps]
            if key in self.normalizer.dims:
                value = self.normalizer.normalize_key(key, value.flatten(2).float())
            out[key] = value
        return out

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Encodes raw observations {key: (B, >=To, ...)} into the global condition (B, To * F)."""
        return self.encoder(self._normalize_obs(obs)).flatten(1)

    def compute_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Denoising loss of a training batch.

        Args:
            batch: ``{"obs": {key: (B, To, ...)}, "action": (B, T, Da)}`` in raw units.

        Returns:
            The scalar mean-squared error of the denoiser's prediction.
        """
        cond = self.encode_obs(batch["obs"])  # (B, To * F)
        actions = self.normalizer.normalize_key(ACTION, batch[ACTION].float())  # (B, T, Da)
        noise = torch.randn_like(actions)
        timesteps = torch.randint(
            0, self.num_train_timesteps, (actions.shape[0],), device=actions.device
        )
        noisy = self.noise_scheduler.add_noise(actions, noise, timesteps)
        pred = self.denoiser(noisy, timesteps, cond)

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "sample":
            target = actions
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(actions, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type={prediction_type!r}")
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def predict_action(
        self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Samples actions for a batch of observations.

        Args:
            obs: Raw observations {key: (B, To, ...)}, the last frame being the current one.
            generator: Optional random generator for reproducible sampling.

        Returns:
            ``"action"``: the executed chunk (B, n_action_steps, Da), starting at the last
            observed step; ``"action_pred"``: the whole predicted horizon (B, horizon, Da).
        """
        cond = self.encode_obs(obs)  # (B, To * F)
        B = cond.shape[0]
        x = torch.randn(
            (B, self.horizon, self.action_dim),
            generator=generator,
            device=cond.device if generator is None else generator.device,
        ).to(device=cond.device, dtype=cond.dtype)  # (B, T, Da)

        scheduler = self.noise_scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=cond.device)
        for t in scheduler.timesteps:
            model_output = self.denoiser(x, t, cond)
            x = scheduler.step(model_output, t, x, generator=generator).prev_sample

        action_pred = self.normalizer.unnormalize_key(ACTION, x)  # (B, T, Da)
        start = self.n_obs_steps - 1
        return {
            "action": action_pred[:, start : start + self.n_action_steps],
            "action_pred": action_pred,
        }
