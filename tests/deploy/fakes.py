"""Fake policies for the deploy tests (their actions say which observations they saw), and a
server on loopback for a test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diffusion_policy.data.keys import LOW_DIM
from diffusion_policy.deploy.server import PolicyServer


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


# -- a small real policy --------------------------------------------------------------------
PUSHT_SHAPE_META = {
    "obs": {
        "keypoint": {"shape": [18], "type": LOW_DIM},
        "agent_pos": {"shape": [2], "type": LOW_DIM},
    },
    "action": {"shape": [2]},
}
# A stored training config, as load_policy reads it: the parts and the window sizes.
TINY_CFG = {
    "encoder": {"_target_": "diffusion_policy.encoders.lowdim.LowDimEncoder", "keys": None},
    "denoiser": {
        "_target_": "diffusion_policy.denoisers.unet.ConditionalUnet1D",
        "_partial_": True,
        "down_dims": [16, 32],
        "kernel_size": 5,
        "n_groups": 8,
        "step_embed_dim": 16,
    },
    "noise_scheduler": {
        "_target_": "diffusers.DDPMScheduler",
        "num_train_timesteps": 20,
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "prediction_type": "epsilon",
    },
    "horizon": 16,
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "policy": {"num_inference_steps": 4},
}


def tiny_policy(seed: int = 0):
    """An untrained Push-T keypoint policy (DDPM, 4 steps) whose actions span the workspace."""
    from omegaconf import OmegaConf

    from diffusion_policy.training.builders import build_policy

    torch.manual_seed(seed)
    policy = build_policy(OmegaConf.create(TINY_CFG), PUSHT_SHAPE_META)
    g = torch.Generator().manual_seed(seed)
    policy.normalizer.fit(
        {
            "keypoint": torch.rand(64, 18, generator=g) * 512,
            "agent_pos": torch.rand(64, 2, generator=g) * 512,
            "action": torch.rand(64, 2, generator=g) * 512,
        }
    )
    return policy.eval()


def write_checkpoint(path, policy) -> None:
    """A checkpoint of ``policy`` as the trainer writes one (EMA = other weights)."""
    from diffusion_policy.training.checkpoint import save_checkpoint

    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in policy.state_dict().items()}
    state = {"config": TINY_CFG, "shape_meta": PUSHT_SHAPE_META, "model": policy.state_dict()}
    save_checkpoint(path, {**state, "ema": {"model": ema}})


@contextmanager
def serving(policy, **kwargs) -> Iterator[tuple[PolicyServer, str]]:
    """A server for ``policy`` on 127.0.0.1 (a free port), in a thread: (server, address)."""
    server = PolicyServer(policy, host="127.0.0.1", port=0, **kwargs)
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        yield server, f"tcp://127.0.0.1:{server.port}"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
        assert not thread.is_alive()
