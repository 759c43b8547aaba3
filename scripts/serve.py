"""Serves a policy over ZeroMQ to any number of clients (see diffusion_policy.deploy.server).

    python scripts/serve.py checkpoint=outputs/.../checkpoints/latest.ckpt port=5555
    python scripts/serve.py checkpoint=exports/pusht                 # an export folder
    python scripts/serve.py checkpoint=exports/pusht/policy.onnx     # ONNX Runtime
    DP_SERVE_TOKEN=... python scripts/serve.py checkpoint=... host=0.0.0.0 allow_remote=true

It listens on 127.0.0.1 unless given ``allow_remote=true`` and a token (``DP_SERVE_TOKEN``);
each request's latency is logged at DEBUG level, a p50/p99 summary at INFO.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from diffusion_policy.deploy.export import load_exported
from diffusion_policy.deploy.server import PolicyServer, check_bind
from diffusion_policy.deploy.warmup import compile_for_inference, set_inference_threads
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.training.builders import load_policy, resolve_device

if TYPE_CHECKING:
    from diffusion_policy.deploy.onnx_policy import OnnxPolicy


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    check_bind(cfg.host, cfg.allow_remote, cfg.token)  # before minutes of model loading
    policy = onnx_policy(cfg) if Path(cfg.checkpoint).suffix == ".onnx" else torch_policy(cfg)
    print(f"sampling threads: {set_inference_threads(policy, cfg.threads)}")
    server = PolicyServer(
        policy,
        host=cfg.host,
        port=cfg.port,
        token=cfg.token,
        allow_remote=cfg.allow_remote,
        max_message_bytes=int(cfg.max_message_mb * 2**20),
        max_batch=cfg.max_batch,
        log_every=cfg.log_every,
    )
    with server:
        print(f"serving {cfg.checkpoint} on tcp://{cfg.host}:{server.port} (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve()


def torch_policy(cfg: DictConfig) -> DiffusionPolicy:
    """The policy of a training checkpoint or an export folder, prepared for sampling."""
    device = resolve_device(cfg.device)
    if Path(cfg.checkpoint).is_dir():
        policy = load_exported(cfg.checkpoint, device)
    else:
        policy, _ = load_policy(
            cfg.checkpoint, device, use_ema=cfg.use_ema, trusted_targets=cfg.trusted_targets
        )
    if cfg.num_inference_steps:
        policy.set_sampler(policy.noise_scheduler, cfg.num_inference_steps)
    print(f"sampling precision: {policy.set_inference_precision(cfg.precision)}")
    if cfg.compile:
        compile_for_inference(policy, batch_size=1)
    return policy


def onnx_policy(cfg: DictConfig) -> OnnxPolicy:
    """A graph from ``scripts/export.py onnx=true``: its sampler and precision are fixed."""
    from diffusion_policy.deploy.onnx_policy import OnnxPolicy  # noqa: F811 (the `onnx` extra)

    for key, unset in (("num_inference_steps", None), ("compile", False)):
        if cfg[key] != unset:
            raise ValueError(f"{key}={cfg[key]} does not apply to an ONNX graph (fixed at export)")
    if cfg.precision not in ("auto", "fp32"):
        raise ValueError(f"precision={cfg.precision} does not apply to an ONNX graph (fp32)")
    policy = OnnxPolicy(cfg.checkpoint)
    print(f"ONNX Runtime: {policy.sampler}, {policy.num_inference_steps} steps, fp32")
    return policy


if __name__ == "__main__":
    main()
