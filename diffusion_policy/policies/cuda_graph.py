"""Sampling replayed as a CUDA graph: one launch per prediction instead of one per kernel."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

Sample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedSampler:
    """Runs ``sample(noise, cond)`` by replaying CUDA graphs captured per input signature.

    At batch 1 a denoising loop is hundreds of small kernels, and the GPU idles while Python
    launches each one; a captured graph launches them all at once. A graph is captured on the
    first call with a given signature (shapes, dtypes, device and ``key()``, e.g. the sampler's
    plan, so a new sampler gets its own graph), after ``warmup`` eager calls on a side stream;
    later calls copy the inputs into the graph's tensors, replay it and return a copy of its
    output. Inputs not on a CUDA device run ``sample`` eagerly.

    The graph reads the module's weights where they were at capture: updating them in place
    (``load_state_dict``) is seen by later replays; moving or re-casting them needs a new
    :class:`GraphedSampler`.

    Args:
        sample: The function to replay; it must launch the same kernels on every call with
            inputs of one signature (no host synchronization, no data-dependent control flow).
        key: Extra state the captured work depends on, part of the signature.
        warmup: Eager calls before a capture (lazy initialization of kernels and workspaces
            must not happen inside the capture).
    """

    def __init__(
        self, sample: Sample, key: Callable[[], Hashable] = lambda: None, warmup: int = 2
    ) -> None:
        self.sample = sample
        self.key = key
        self.warmup = warmup
        self._graphs: dict[Hashable, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if noise.device.type != "cuda":
            return self.sample(noise, cond)
        signature = (
            tuple(noise.shape),
            tuple(cond.shape),
            noise.dtype,
            cond.dtype,
            noise.device,
            self.key(),
        )
        if signature not in self._graphs:
            self._graphs[signature] = self._capture(noise, cond)
        graph, static_noise, static_cond, static_out = self._graphs[signature]
        static_noise.copy_(noise)
        static_cond.copy_(cond)
        graph.replay()
        return static_out.clone()

    @property
    def n_graphs(self) -> int:
        """How many graphs have been captured (one per signature seen)."""
        return len(self._graphs)

    def _capture(
        self, noise: torch.Tensor, cond: torch.Tensor
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        static_noise, static_cond = noise.clone(), cond.clone()
        side = torch.cuda.Stream(device=noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.sample(static_noise, static_cond)
        torch.cuda.current_stream(noise.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.sample(static_noise, static_cond)
        except RuntimeError as e:  # torch.AcceleratorError is one
            raise RuntimeError(
                "sampling could not be captured as a CUDA graph (an operation in it waits for "
                "the host); sample eagerly or compile the denoiser alone "
                f"(compile_sampling(whole_loop=False)): {e}"
            ) from e
        return graph, static_noise, static_cond, static_out
