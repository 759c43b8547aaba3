"""Fake policies for the deploy tests: their actions say which observations they saw."""

from __future__ import annotations

import time

import torch

from diffusion_policy.data.keys import LOW_DIM


class EchoPolicy:
    """Action ``i`` of a chunk is the newest observation + ``i``.

    Fed the tick number as its observation, a controller whose chunks are aligned in time
    returns the tick number as every action, whichever chunk it comes from.

    Args:
        n_obs_steps: To.
        n_action_steps: Ta used by a controller.
        chunk: Actions returned per call (>= n_action_steps).
        delay_s: Seconds each call sleeps (a slow model).
    """

    def __init__(
        self, n_obs_steps: int = 2, n_action_steps: int = 4, chunk: int = 6, delay_s: float = 0.0
    ) -> None:
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.horizon = chunk
        self.delay_s = delay_s
        self.shape_meta = {
            "obs": {"obs": {"shape": [1], "type": LOW_DIM}},
            "action": {"shape": [1]},
        }
        self.calls: list[list[list[float]]] = []  # per call: (B, To) observations seen
        self.generators: list[torch.Generator | None] = []

    def predict_action(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        x = obs["obs"]  # (B, To, 1)
        self.calls.append(x[..., 0].tolist())
        self.generators.append(generator)
        if self.delay_s:
            time.sleep(self.delay_s)
        steps = torch.arange(self.horizon, dtype=torch.float32).view(1, -1, 1)
        return {"action": x[:, -1:, :] + steps}  # (B, chunk, 1)
