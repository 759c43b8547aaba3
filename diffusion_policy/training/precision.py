"""Mixed precision: bf16 autocast with fp32 master weights, as a config switch.

``trainer.precision=auto`` (the default) picks bf16 where the hardware multiplies bf16 natively
(CUDA GPUs with bf16 support, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere, and logs the
choice once with its reason; ``fp32`` and ``bf16`` force either.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Flags worth naming when explaining a choice: the vector extensions oneDNN dispatches on.
_NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU feature flags of ``/proc/cpuinfo`` (or of ``cpuinfo``); None where unreadable.

    Args:
        cpuinfo: The text of ``/proc/cpuinfo``; read from there when None.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None  # not Linux
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset(cpuinfo.split())  # a bare list of flags


def cpu_has_bf16_math(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    Without them oneDNN emulates bf16 matrix products, which is far slower than fp32 (measured
    on an AVX2-only EPYC: 1-17 GFLOP/s in bf16 against 80-115 GFLOP/s in fp32).

    Args:
        cpuinfo: The text of ``/proc/cpuinfo``; read from there when None.
    """
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return True  # not Linux: cannot tell, trust the user
    return any(f in flags for f in BF16_CPU_FLAGS)


def choose_precision(
    device: torch.device,
    flags: frozenset[str] | None = None,
    cuda_bf16: bool | None = None,
) -> tuple[str, str]:
    """What ``precision=auto`` means on ``device``: ``(precision, reason)``.

    Args:
        device: Where the model runs.
        flags: The CPU's feature flags; this machine's (:func:`cpu_flags`) when None.
        cuda_bf16: Whether the GPU runs bf16 natively; ``torch.cuda.is_bf16_supported()`` when
            None.
    """
    if device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return "bf16", "this GPU runs bf16 natively"
        return "fp32", "this GPU has no native bf16"
    if device.type != "cpu":
        return "fp32", f"bf16 autocast is not assumed on device type {device.type!r}"
    if flags is None:
        flags = cpu_flags()
        if flags is None:
            return "fp32", "the CPU flags are unreadable here (no /proc/cpuinfo)"
    notable = " ".join(f for f in _NOTABLE_FLAGS if f in flags) or "none of " + " ".join(
        _NOTABLE_FLAGS
    )
    if any(f in flags for f in BF16_CPU_FLAGS):
        return "bf16", f"this CPU has native bf16 (flags: {notable})"
    return "fp32", f"this CPU has no native bf16 (flags: {notable})"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``precision`` itself, or what ``auto`` means on ``device``.

    The choice for ``auto`` is logged once per device type, with its reason.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} must be one of {PRECISIONS}")
    if precision != "auto":
        return precision
    return _auto_precision(device.type)


@functools.cache
def _auto_precision(device_type: str) -> str:
    precision, reason = choose_precision(torch.device(device_type))
    log.info("precision=auto -> %s: %s", precision, reason)
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context that runs a forward pass in ``precision``.

    Args:
        device: Where the model runs.
        precision: ``auto`` (see :func:`choose_precision`), ``fp32`` (no autocast) or ``bf16``
            (matrix products and convolutions in bfloat16, reductions and the weights in
            float32).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu":
        _warn_if_emulated()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@functools.cache
def _warn_if_emulated() -> None:
    if not cpu_has_bf16_math():
        log.warning(
            "trainer.precision=bf16 on a CPU without AVX512-BF16/AMX: bf16 matrix products are "
            "emulated and much slower than fp32 here; use trainer.precision=fp32 or auto"
        )
