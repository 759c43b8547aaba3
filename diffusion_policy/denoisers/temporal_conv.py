"""The UNet's temporal convolution, computed by whichever of two equal paths is faster here.

Action sequences are short (16 steps, 4 at the UNet's bottom) and wide (up to 2048 channels).
On some CPUs oneDNN's direct convolution is slow for that shape (on an AVX2 EPYC its backward
pass ran at a fraction of the GEMM rate, and a GEMM over unfolded windows trained 2x faster); on
others it is the faster one. So on a CPU both paths are timed once per (shape, dtype, autocast,
grad mode) at first use and the faster one is kept for the process (:data:`CHOICES`). CUDA keeps
cuDNN. ``DP_CONV_PATH=gemm|direct|auto`` (or :func:`set_conv_path`) forces either path.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

ENV_VAR = "DP_CONV_PATH"
PATHS = ("auto", "gemm", "direct")
DEFAULT_PATH = "gemm"  # where nothing was measured: inside torch.compile, under a dispatch mode
# Runs of each path, interleaved: WARMUP untimed, then at least MIN_REPEATS timed, more (up to
# MAX_REPEATS) while the trial has taken under MIN_SECONDS: a median of a few microsecond-long
# runs on a loaded machine says little.
WARMUP, MIN_REPEATS, MAX_REPEATS, MIN_SECONDS = 1, 3, 25, 0.05
# The other path must beat the default by this fraction: near ties (within the noise of a loaded
# machine) keep the default rather than flip from one run to the next.
MARGIN = 0.1

# (B, C_in, C_out, T, k, dtype, autocast dtype or None, training) -> "gemm" | "direct"
CHOICES: dict[tuple, str] = {}
_forced: str | None = None


def set_conv_path(path: str | None) -> None:
    """Forces a path for this process (``gemm``, ``direct`` or ``auto``); None defers to the env.

    Raises:
        ValueError: ``path`` is not one of :data:`PATHS`.
    """
    global _forced
    if path is not None:
        _check_path(path, "conv path")
    _forced = path


def conv_path_setting() -> str:
    """The path asked for: :func:`set_conv_path`'s, else ``$DP_CONV_PATH``, else ``auto``.

    Raises:
        ValueError: ``$DP_CONV_PATH`` is not one of :data:`PATHS`.
    """
    if _forced is not None:
        return _forced
    return _check_path(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def _check_path(path: str, name: str) -> str:
    if path not in PATHS:
        raise ValueError(f"{name}={path!r} must be one of {PATHS}")
    return path


def conv1d_direct(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The library's "same"-padded convolution (oneDNN on a CPU, cuDNN on a GPU).

    Args:
        x: (B, C_in, T).
        weight: (C_out, C_in, k), k odd.
        bias: (C_out,).

    Returns:
        (B, C_out, T).
    """
    return F.conv1d(x, weight, bias, padding=weight.shape[-1] // 2)


def conv1d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same convolution as :func:`conv1d_direct`, as one GEMM over unfolded windows.

    ``F.linear`` reads the weight in its own (C_out, C_in * k) layout: with bf16 weights at
    batch 1, where a call waits for the weight's bytes, that ran the paper UNet's layers 11-15%
    faster than a product with the transposed weight.
    """
    B, C, T = x.shape
    C_out, _, k = weight.shape
    windows = F.pad(x, (k // 2, k // 2)).unfold(2, k, 1)  # (B, C_in, T, k)
    windows = windows.transpose(1, 2).reshape(B * T, C * k)
    y = F.linear(windows, weight.reshape(C_out, C * k), bias)  # (B * T, C_out)
    return y.view(B, T, C_out).transpose(1, 2)  # (B, C_out, T)


CONV_PATHS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gemm": conv1d_gemm,
    "direct": conv1d_direct,
}


class TemporalConv1d(nn.Conv1d):
    """A "same"-padded Conv1d whose CPU path (GEMM or direct) is chosen by measurement.

    The GEMM path (:func:`conv1d_gemm`) turns the convolution into a single
    (B * T, C_in * k) @ (C_in * k, C_out) product. Both paths compute the same convolution (they
    differ by float round-off), and the parameters are those of ``nn.Conv1d``, so checkpoints do
    not depend on the path.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        # "Same" padding of k // 2 on both sides keeps the length only for an odd kernel.
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd")
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T) -> (B, C_out, T)."""
        if x.device.type != "cpu":
            return conv1d_direct(x, self.weight, self.bias)  # cuDNN
        path = conv_path_setting()
        if path == "auto":
            path = self._measured_path(x)
        return CONV_PATHS[path](x, self.weight, self.bias)

    def _measured_path(self, x: torch.Tensor) -> str:
        """The faster path for this call's shape: cached, or timed now and cached."""
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        key = (*x.shape, self.out_channels, self.kernel_size[0], x.dtype, amp, training)
        path = CHOICES.get(key)
        if path is not None:
            return path
        # Not inside a traced region (torch.compile) nor under a dispatch mode (a FLOP
        # counter would count the trial runs): there the default path runs, nothing is cached.
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return DEFAULT_PATH
        with torch.random.fork_rng(devices=[]):  # trial inputs must not move the global RNG
            times = time_paths(x, self.weight, self.bias, training)
        path = CHOICES[key] = _faster(times)
        log.debug(
            "TemporalConv1d %s: gemm %.3f ms, direct %.3f ms -> %s",
            key,
            1e3 * times["gemm"],
            1e3 * times["direct"],
            path,
        )
        return path


def _faster(times: dict[str, float]) -> str:
    """The path with the least time, the default unless another beats it by :data:`MARGIN`."""
    best = min(times, key=times.get)
    return best if times[best] < (1 - MARGIN) * times[DEFAULT_PATH] else DEFAULT_PATH


def time_paths(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, training: bool
) -> dict[str, float]:
    """Median seconds of each path on a random input like ``x``; forward+backward if training.

    The paths run on copies of the parameters, so the module's gradients stay untouched.
    """
    weight = weight.detach().clone().requires_grad_(training)
    bias = bias.detach().clone().requires_grad_(training)
    inp = torch.randn_like(x).requires_grad_(training)

    def run(path: str) -> float:
        start = time.perf_counter()
        y = CONV_PATHS[path](inp, weight, bias)
        if training:
            y.backward(torch.ones_like(y))
            inp.grad = weight.grad = bias.grad = None
        return time.perf_counter() - start

    for _ in range(WARMUP):
        for path in CONV_PATHS:
            run(path)
    times: dict[str, list[float]] = {path: [] for path in CONV_PATHS}
    start = time.perf_counter()
    for i in range(MAX_REPEATS):
        if i >= MIN_REPEATS and time.perf_counter() - start >= MIN_SECONDS:
            break
        for path in CONV_PATHS:  # interleaved, so a burst of load on the machine hits both
            times[path].append(run(path))
    return {path: statistics.median(ts) for path, ts in times.items()}
