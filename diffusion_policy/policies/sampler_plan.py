"""A deterministic diffusers sampler written out as a fixed recurrence, for a tight sampling loop.

The deterministic samplers of the DDPM family (DDIM with eta 0, DPM-Solver++, UniPC) all work
the same way: at step i the model output gives a clean-sample estimate
``u_i = p_i * x_i + q_i * out_i`` and its clipped value ``c_i = clip(u_i)``, and every sample the
model sees is a fixed linear combination of the initial noise and the estimates so far,
``x_i = a_i * x_T + sum_{j < i} (b_ij * c_j + r_ij * u_j)``. (The multistep solvers use only
the clipped estimates; DDIM also steps along the unclipped noise estimate, so r is not 0
there.) The coefficients depend only on the schedule and the number of steps, so they are read
off the diffusers scheduler once, by running copies of it on unit probes with
``prediction_type="sample"``, where its step is linear: one copy without clipping gives
b + r, one that clips every estimate to 0 gives r. The loop then costs a few tensor operations
per step instead of the scheduler's Python, and it compiles into one graph with the denoiser.

:func:`plan_sampler` returns a plan only after replaying the real scheduler, clipping included,
on random inputs and matching it; other schedulers (DDPM, or any that draw noise) keep the
diffusers loop.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin

log = logging.getLogger(__name__)

# Largest difference from the diffusers loop accepted in the check (float32, samples in [-1, 1]).
# A wrong plan differs by tenths; float round-off by up to 3e-4 (a DPM-Solver++ with
# thresholding on an AVX-512 CPU, where 1e-4 refused a correct plan).
TOLERANCE = 5e-4
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class SamplerPlan:
    """The coefficients of a deterministic sampler with S model calls.

    Attributes:
        timesteps: The timestep of each model call (S,).
        x0_coefs: (p_i, q_i) per call: ``u_i = p_i * x_i + q_i * out_i``.
        noise_coefs: a_i for i = 0..S: the weight of the initial noise in the model's input at
            call i (i = S: in the result).
        clipped_coefs: b_i for i = 0..S (row i has i entries): the weights of c_0..c_(i-1).
        raw_coefs: r_i, the same for u_0..u_(i-1).
        clip: The clean-sample bound (``clip_sample`` or ``thresholding`` at
            ``sample_max_value`` 1), or None.
    """

    timesteps: tuple[int, ...]
    x0_coefs: tuple[tuple[float, float], ...]
    noise_coefs: tuple[float, ...]
    clipped_coefs: tuple[tuple[float, ...], ...]
    raw_coefs: tuple[tuple[float, ...], ...]
    clip: float | None

    def run(
        self, denoise: Callable[[torch.Tensor, int], torch.Tensor], noise: torch.Tensor
    ) -> torch.Tensor:
        """Samples from ``noise`` (B, T, Da); ``denoise(x, i)`` is the model's output at call i."""
        raw: list[torch.Tensor] = []
        clipped: list[torch.Tensor] = []
        for i, (p, q) in enumerate(self.x0_coefs):
            x = self._combine(i, noise, clipped, raw)  # (B, T, Da)
            raw.append(p * x + q * denoise(x, i))
            clipped.append(raw[-1] if self.clip is None else raw[-1].clamp(-self.clip, self.clip))
        return self._combine(len(self.x0_coefs), noise, clipped, raw)

    def _combine(
        self, i: int, noise: torch.Tensor, clipped: list[torch.Tensor], raw: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self.noise_coefs[i] * noise
        terms = zip(self.clipped_coefs[i] + self.raw_coefs[i], clipped + raw, strict=True)
        for coef, estimate in terms:
            if coef != 0.0:
                x = x + coef * estimate
        return x


def plan_sampler(scheduler: SchedulerMixin, num_inference_steps: int) -> SamplerPlan | None:
    """The :class:`SamplerPlan` of ``scheduler`` at ``num_inference_steps``, or None.

    None means the scheduler is not a deterministic sampler of that form (it draws noise, scales
    its inputs, thresholds dynamically, or predicts something else); the caller then runs the
    diffusers loop. The scheduler itself is not changed.
    """
    config = scheduler.config
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS or getattr(scheduler, "alphas_cumprod", None) is None:
        return None
    clip = _clip_bound(config)
    if clip is False or _draws_noise(scheduler, num_inference_steps):
        return None
    try:
        plan = _probe(scheduler, num_inference_steps, prediction, clip)
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # a step we cannot probe
        log.debug("no sampler plan for %s: %s", type(scheduler).__name__, err)
        return None
    if plan is None or not _matches(plan, scheduler, num_inference_steps):
        return None
    return plan


@functools.cache
def takes_generator(scheduler_type: type) -> bool:
    """Whether the scheduler's ``step`` draws noise from a ``generator`` argument (UniPC takes
    none)."""
    return "generator" in inspect.signature(scheduler_type.step).parameters


def _draws_noise(scheduler: SchedulerMixin, steps: int) -> bool:
    """Whether the first step's result depends on the random generator (DDPM: it does)."""
    if not takes_generator(type(scheduler)):
        return False
    x, out = torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 0.1)
    results = []
    for seed in (0, 1):
        real = copy.deepcopy(scheduler)
        real.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        results.append(real.step(out, real.timesteps[0], x, generator=gen).prev_sample)
    return not torch.equal(*results)


def _clip_bound(config: dict) -> float | None | bool:
    """The fixed clean-sample bound, None without clipping, or False for dynamic thresholding."""
    if config.get("thresholding", False):
        # s = clamp(quantile(|x0|), 1, sample_max_value) is 1 whenever the maximum is 1.
        return 1.0 if float(config.get("sample_max_value", 1.0)) == 1.0 else False
    if config.get("clip_sample", False):
        return float(config.get("clip_sample_range", 1.0))
    return None


def _probe(
    scheduler: SchedulerMixin, steps: int, prediction: str, clip: float | None
) -> SamplerPlan | None:
    """Reads the coefficients off linear copies of the scheduler, in float64."""
    linear = {"prediction_type": "sample", "thresholding": False}
    cls, config = type(scheduler), scheduler.config
    probed = _probe_rows(cls.from_config(config, **linear, clip_sample=False), steps)
    if probed is None:
        return None
    timesteps, rows = probed
    raw = torch.zeros_like(rows)
    if "clip_sample" in scheduler.config:  # clip every estimate to 0: what is left is r
        zeroed = cls.from_config(config, **linear, clip_sample=True, clip_sample_range=0.0)
        raw = _probe_rows(zeroed, steps)[1]
    # Else the scheduler cannot clip but by thresholding, which its steps see alone: r = 0.
    alphas = scheduler.alphas_cumprod.double()
    return SamplerPlan(
        timesteps=timesteps,
        x0_coefs=tuple(_x0_coefs(float(alphas[t]), prediction) for t in timesteps),
        noise_coefs=tuple(rows[:, 0].tolist()),
        clipped_coefs=tuple(tuple((rows - raw)[i, 1 : i + 1].tolist()) for i in range(len(rows))),
        raw_coefs=tuple(tuple(raw[i, 1 : i + 1].tolist()) for i in range(len(rows))),
        clip=clip,
    )


def _probe_rows(linear: SchedulerMixin, steps: int) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """The timesteps, and the coefficients (S + 1, S + 1) of each model input over the noise
    (column 0) and the estimates (column j + 1), of a scheduler linear in its inputs."""
    linear.set_timesteps(steps)
    S = len(linear.timesteps)
    probe = torch.zeros(S + 1, 1, 1, dtype=torch.float64)
    probe[0] = float(linear.init_noise_sigma)  # probe 0: the noise; probe j + 1: estimate j
    if not torch.equal(linear.scale_model_input(probe, linear.timesteps[0]), probe):
        return None  # a sigma-scaled sampler (Euler, ...): its inputs are not the samples
    rows = [probe.flatten()]
    for i, t in enumerate(linear.timesteps):
        estimate = torch.zeros_like(probe)
        estimate[i + 1] = 1.0
        probe = linear.step(estimate, t, probe).prev_sample
        rows.append(probe.flatten())
    return tuple(int(t) for t in linear.timesteps), torch.stack(rows)


def _x0_coefs(alpha_bar: float, prediction: str) -> tuple[float, float]:
    """(p, q) of the clean-sample estimate ``p * x + q * out`` for the prediction type."""
    a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction == "epsilon":
        return 1.0 / a, -s / a
    if prediction == "v_prediction":
        return a, -s
    return 0.0, 1.0


def _matches(plan: SamplerPlan, scheduler: SchedulerMixin, steps: int) -> bool:
    """Whether the plan feeds the model what the real scheduler's loop feeds it, and ends where
    it ends, for a stand-in model whose output depends on its input."""
    real = copy.deepcopy(scheduler)
    real.set_timesteps(steps)
    if [int(t) for t in real.timesteps] != list(plan.timesteps):
        return False
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 16, 2, generator=gen)
    offsets = torch.randn(len(plan.timesteps), 4, 16, 2, generator=gen)
    inputs: dict[str, list[torch.Tensor]] = {"real": [], "plan": []}

    def model(x: torch.Tensor, i: int, log: list[torch.Tensor]) -> torch.Tensor:
        log.append(x)
        return offsets[i] + 0.5 * x

    kwargs = {"generator": gen} if takes_generator(type(real)) else {}
    x = noise * real.init_noise_sigma
    for i, t in enumerate(real.timesteps):
        x = real.step(model(x, i, inputs["real"]), t, x, **kwargs).prev_sample
    if plan.clip is not None:
        x = x.clamp(-plan.clip, plan.clip)
    mine = plan.run(lambda x, i: model(x, i, inputs["plan"]), noise)
    pairs = [*zip(inputs["real"], inputs["plan"], strict=True), (x, mine)]
    return all(float((a - b).abs().max()) <= TOLERANCE for a, b in pairs)
