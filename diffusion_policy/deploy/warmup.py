"""Preparing a policy for serving: the compile paid before the first request, and the number
of threads that samples fastest here."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._inductor.config as inductor_config

from diffusion_policy.data.keys import LOW_DIM
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.utils.timing import alternating

log = logging.getLogger(__name__)


def example_obs(policy: Any, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Zero observations of the policy's shapes: {key: (B, To, ...)}, float32 or uint8 images."""
    params = policy.parameters() if isinstance(policy, torch.nn.Module) else iter(())
    device = next(params, torch.empty(0)).device
    obs = {}
    for key, meta in policy.shape_meta["obs"].items():
        dtype = torch.float32 if meta["type"] == LOW_DIM else torch.uint8
        shape = (batch_size, policy.n_obs_steps, *meta["shape"])
        obs[key] = torch.zeros(shape, dtype=dtype, device=device)
    return obs


def compile_for_inference(policy: DiffusionPolicy, batch_size: int = 1) -> float:
    """Compiles sampling for static shapes and warms it up at ``batch_size``.

    See :meth:`DiffusionPolicy.compile_sampling`: the whole denoising loop where the sampler is
    deterministic, else the denoiser. ``torch.compile`` compiles on the first call; here that
    call is a prediction on :func:`example_obs`, so a server's first client (or a timed
    benchmark) does not wait for it. Other batch sizes compile on their first use.

    Returns:
        The seconds the compile and warm-up took.
    """
    start = time.perf_counter()
    # Generated kernels read the thread count at run time rather than baking in today's, so
    # choose_inference_threads can still change it.
    with inductor_config.patch({"cpp.dynamic_threads": True}):
        policy.compile_sampling()
        policy.predict_action(example_obs(policy, batch_size))
    seconds = time.perf_counter() - start
    log.info("compiled sampling for batch %d in %.1f s", batch_size, seconds)
    return seconds


def thread_candidates(most: int | None = None) -> list[int]:
    """Thread counts worth timing: powers of two below ``most`` (default: torch's count now)
    and ``most`` itself."""
    most = most or torch.get_num_threads()
    counts = {most}
    n = 1
    while n < most:
        counts.add(n)
        n *= 2
    return sorted(counts)


def fastest_threads(
    predict: Callable[[], object],
    candidates: Sequence[int],
    repeats: int = 7,
    clock: Callable[[], float] = time.perf_counter,
    set_threads: Callable[[int], None] = torch.set_num_threads,
) -> tuple[int, dict[int, float]]:
    """Times ``predict`` at each intra-op thread count and keeps the fastest.

    At batch 1 a denoiser's kernels are small, and on some CPUs threads cost more in
    synchronization than they save (on a 2-core AVX2 EPYC, the compiled CPU recipe sampled in
    30.7 ms at 1 thread and 32.8 ms at 2); on others more threads win. The counts take turns
    (one call each per round, after one untimed round), so a burst of load on the machine hits
    them all.

    Args:
        predict: One prediction, e.g. ``lambda: policy.predict_action(obs)``.
        candidates: Thread counts to try, e.g. :func:`thread_candidates`.
        repeats: Timed rounds; the median of each count's times is compared.
        clock: Seconds now (a parameter for tests).
        set_threads: Sets the count predict runs with (an :class:`~diffusion_policy.deploy.
            onnx_policy.OnnxPolicy`'s ``set_num_threads`` for ONNX Runtime).

    Returns:
        The fastest count, which ``set_threads`` is left at, and the median seconds of each
        count.

    Raises:
        ValueError: No candidates, or a count below 1.
    """
    if not candidates or min(candidates) < 1:
        raise ValueError(f"thread candidates must be counts >= 1, got {list(candidates)}")

    def at(n: int) -> Callable[[], None]:
        def run() -> None:
            set_threads(n)
            predict()

        return run

    times = alternating({n: at(n) for n in candidates}, repeats, clock)
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    best = min(medians, key=medians.get)
    set_threads(best)
    return best, medians


def choose_inference_threads(policy: Any, batch_size: int = 1) -> int:
    """Sets the thread count that samples ``batch_size`` fastest here: torch's, or an
    :class:`~diffusion_policy.deploy.onnx_policy.OnnxPolicy`'s.

    Call it after :func:`compile_for_inference` (a compile inside the timing would decide the
    choice). Candidates: :func:`thread_candidates` up to the count torch uses now.

    Returns:
        The thread count chosen.
    """
    obs = example_obs(policy, batch_size)
    set_threads = getattr(policy, "set_num_threads", torch.set_num_threads)
    best, medians = fastest_threads(
        lambda: policy.predict_action(obs), thread_candidates(), set_threads=set_threads
    )
    if hasattr(policy, "drop_other_sessions"):
        policy.drop_other_sessions()
    timings = ", ".join(f"{n}: {1e3 * s:.1f} ms" for n, s in medians.items())
    log.info("sampling threads for batch %d: %d (%s)", batch_size, best, timings)
    return best


def set_inference_threads(policy: Any, setting: int | str) -> int:
    """Applies a thread setting: ``"auto"`` (:func:`choose_inference_threads` at batch 1) or a
    count.

    Returns:
        The thread count set.

    Raises:
        ValueError: ``setting`` is neither ``"auto"`` nor a count >= 1.
    """
    if setting == "auto":
        return choose_inference_threads(policy)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"threads={setting!r} must be 'auto' or a count >= 1")
    getattr(policy, "set_num_threads", torch.set_num_threads)(setting)
    return setting
