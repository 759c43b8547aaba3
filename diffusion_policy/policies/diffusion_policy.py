"""The diffusion policy: observation encoder + denoiser + diffusers noise scheduler + normalizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from torch import nn

from diffusion_policy.data.action_origin import parse_action_origin
from diffusion_policy.data.keys import ACTION, LOW_DIM, OBS, raw_key
from diffusion_policy.data.normalizer import LinearNormalizer
from diffusion_policy.policies.cuda_graph import GraphedSampler
from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.policies.sampler_plan import SamplerPlan, plan_sampler, takes_generator
from diffusion_policy.training.precision import resolve_precision
from diffusion_policy.utils.checks import check_window


class DiffusionPolicy(nn.Module):
    """Predicts a chunk of actions by iteratively denoising Gaussian noise.

    The observation of the last ``n_obs_steps`` frames is encoded once, frame by frame, into the
    condition (B, To, F); the denoiser predicts the noise (or the clean actions) of a
    ``horizon``-long action sequence.
    Of the predicted horizon, the ``n_action_steps`` actions starting at the last observed step
    are the ones executed.

    Args:
        shape_meta: The dataset's shape description (observation keys with shapes and types,
            and the action shape).
        encoder: Maps normalized observations {key: (B, To, ...)} to (B, To, encoder.output_dim).
        denoiser: Factory ``denoiser(action_dim=, cond_dim=, n_obs_steps=, horizon=)`` returning
            the network called as ``denoiser(sample (B, T, Da), timestep, cond (B, To, F))``,
            e.g. a ``functools.partial`` of :class:`ConditionalUnet1D` made by Hydra;
            ``cond_dim`` is the per-frame feature size F.
        noise_scheduler: A diffusers scheduler (DDPM, DDIM, DPM-Solver, ...). Training noises
            actions with its ``alphas_cumprod``; sampling runs its ``step``. When its config asks
            to clip (``clip_sample`` or ``thresholding``), the final sample is clamped too.
        horizon: Length of the predicted action sequence.
        n_obs_steps: Number of observation frames conditioning the prediction.
        n_action_steps: Number of actions executed per prediction.
        num_inference_steps: Denoising steps when sampling; the scheduler's training steps if None.
        action_origin: Relative actions: ``{obs_key: indices}``, one index per action
            dimension into the key's frame; the policy predicts each action minus those
            values of the current frame (:mod:`~diffusion_policy.data.action_origin`). Its
            normalizer must be fit on relative actions
            (``dataset.get_normalizer_data(action_origin)``). None: absolute actions.
        noise_policy: A learned initial-noise distribution (:class:`NoisePolicy`, written by
            RL fine-tuning with ``actor=noise``): its settings ``{hidden_dims, init_std,
            max_mean}``. None: the sampler starts from N(0, I).
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
        action_origin: Mapping[str, Sequence[int]] | None = None,
        noise_policy: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_window(horizon, n_obs_steps, n_action_steps)
        self.shape_meta = shape_meta
        self.action_dim = int(shape_meta[ACTION]["shape"][0])
        self.action_origin = parse_action_origin(action_origin, shape_meta)
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps

        self.encoder = encoder
        self.denoiser = denoiser(
            action_dim=self.action_dim,
            cond_dim=encoder.output_dim,
            n_obs_steps=n_obs_steps,
            horizon=horizon,
        )
        self.noise_policy: NoisePolicy | None = None
        if noise_policy is not None:
            self.noise_policy = NoisePolicy.from_config(
                noise_policy, n_obs_steps * encoder.output_dim, horizon, self.action_dim
            )
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.num_inference_steps = _check_steps(num_inference_steps) or self.num_train_timesteps

        low_dim = {
            k: int(torch.Size(m["shape"]).numel())
            for k, m in shape_meta["obs"].items()
            if m.get("type", LOW_DIM) == LOW_DIM
        }
        self.normalizer = LinearNormalizer({**low_dim, ACTION: self.action_dim})
        # Deterministic samplers run as a fixed recurrence (policies/sampler_plan.py), equal to
        # the diffusers loop; False keeps the diffusers loop.
        self.use_sampler_plan = True
        self.inference_dtype = torch.float32  # the denoiser's when sampling (see below)
        self._compiled_sample: Callable[..., torch.Tensor] | None = None

    def set_n_action_steps(self, n_action_steps: int) -> None:
        """Returns chunks of ``n_action_steps`` actions from now on, without retraining.

        Args:
            n_action_steps: Actions per returned chunk (Ta), from the last observed step on.

        Raises:
            ValueError: The window ``n_obs_steps - 1 + n_action_steps`` exceeds the horizon.
        """
        check_window(self.horizon, self.n_obs_steps, n_action_steps)
        self.n_action_steps = n_action_steps

    def set_sampler(
        self, noise_scheduler: SchedulerMixin, num_inference_steps: int | None = None
    ) -> None:
        """Samples with another diffusers scheduler and/or number of steps, without retraining.

        Args:
            noise_scheduler: The new scheduler. It must describe the noise schedule the denoiser
                was trained on: the same cumulative alphas and prediction type.
            num_inference_steps: Denoising steps; None keeps the current number.

        Raises:
            ValueError: The scheduler's noise schedule or prediction type differs from training,
                or ``num_inference_steps`` is 0 or less.
        """
        _check_steps(num_inference_steps)
        old, new = self.noise_scheduler, noise_scheduler
        old_alphas = getattr(old, "alphas_cumprod", None)
        new_alphas = getattr(new, "alphas_cumprod", None)
        if (
            old_alphas is None
            or new_alphas is None
            or old_alphas.shape != new_alphas.shape
            or not torch.allclose(old_alphas, new_alphas)
        ):
            raise ValueError(
                f"{type(new).__name__}(num_train_timesteps={new.config.num_train_timesteps}, "
                f"beta_schedule={new.config.get('beta_schedule')!r}) does not have the noise "
                f"schedule the denoiser was trained on: {type(old).__name__}("
                f"num_train_timesteps={old.config.num_train_timesteps}, "
                f"beta_schedule={old.config.get('beta_schedule')!r})"
            )
        if new.config.prediction_type != old.config.prediction_type:
            raise ValueError(
                f"prediction_type={new.config.prediction_type!r} differs from the trained "
                f"{old.config.prediction_type!r}"
            )
        self.noise_scheduler = new
        if num_inference_steps:
            self.num_inference_steps = num_inference_steps

    # ----------------------------------------------------------------------------------------
    def _normalize_obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalizes the low-dim keys and keeps the first n_obs_steps frames of each key.

        The keys the encoder names in ``raw_obs`` (whose angles or geometry it reads as
        observed) are also passed un-normalized, flat, under ``raw_key(key)``.
        """
        raw = getattr(self.encoder, "raw_obs", ())
        out = {}
        for key, value in obs.items():
            value = value[:, : self.n_obs_steps]
            if key in self.normalizer.dims:
                flat = value.flatten(2).float()  # (B, To, D)
                value = self.normalizer.normalize_key(key, flat)
                if key in raw:
                    out[raw_key(key)] = flat  # (B, To, D)
            out[key] = value
        return out

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Encodes raw observations {key: (B, >=To, ...)} into the condition (B, To, F)."""
        return self.encoder(self._normalize_obs(obs))

    def action_offset(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The origin of relative actions in the current frame (B, 1, Da), raw units; None for
        absolute actions."""
        if self.action_origin is None:
            return None
        key, dims = self.action_origin
        frame = obs[key][:, self.n_obs_steps - 1].flatten(1).float()  # (B, D)
        return frame[:, dims].unsqueeze(1)

    def forward(self, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        """The training loss: :meth:`compute_loss` with its keyword arguments.

        Training calls the module rather than ``compute_loss`` so that a
        ``DistributedDataParallel`` wrapper's hooks run and average the gradients across ranks.
        """
        return self.compute_loss(batch, **kwargs)

    def compute_loss(
        self,
        batch: Mapping[str, Any],
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss of a training batch.

        Args:
            batch: ``{"obs": {key: (B, To, ...)}, "action": (B, T, Da)}`` in raw units.
            noise: The Gaussian noise added to the normalized actions (B, T, Da); drawn if None.
            timesteps: The diffusion step of each sample (B,); drawn uniformly if None.

        Returns:
            The scalar mean-squared error of the denoiser's prediction.
        """
        cond = self.encode_obs(batch["obs"])  # (B, To, F)
        actions = batch[ACTION].float()  # (B, T, Da)
        offset = self.action_offset(batch[OBS])
        if offset is not None:
            actions = actions - offset
        actions = self.normalizer.normalize_key(ACTION, actions)
        if noise is None:
            noise = torch.randn_like(actions)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.num_train_timesteps, (actions.shape[0],), device=actions.device
            )
        # The forward process x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, from the scheduler's
        # cumulative alphas rather than its `add_noise`: the multistep solvers' `add_noise`
        # (DPM-Solver, UniPC) looks sigmas up by their inference timesteps, which does not noise
        # arbitrary training steps correctly. For DDPM and DDIM the two are the same.
        alpha_bar = self.alphas_cumprod(actions)[timesteps].view(-1, 1, 1)  # (B, 1, 1)
        noisy = alpha_bar.sqrt() * actions + (1 - alpha_bar).sqrt() * noise
        pred = self.denoiser(noisy, timesteps, cond)

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "sample":
            target = actions
        elif prediction_type == "v_prediction":
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * actions
        else:
            raise ValueError(f"unsupported prediction_type={prediction_type!r}")
        return F.mse_loss(pred, target)

    def alphas_cumprod(self, like: torch.Tensor) -> torch.Tensor:
        """The scheduler's cumulative alphas (num_train_timesteps,) on ``like``'s device."""
        alphas_cumprod = getattr(self.noise_scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(
                f"noise scheduler {type(self.noise_scheduler).__name__} has no alphas_cumprod; "
                "only discrete-time (DDPM-family) diffusers schedulers are supported"
            )
        return alphas_cumprod.to(device=like.device, dtype=like.dtype)

    def clip_range(self) -> float | None:
        """The bound of normalized samples when the scheduler config asks to clip, else None.

        DDPM and DDIM clip the predicted clean sample (``clip_sample``); the multistep solvers
        threshold it (``thresholding``, at most ``sample_max_value``). Their last step returns
        that clean sample, so clamping the final sample to the same bound changes nothing there;
        it keeps any scheduler that clips along the way (and float round-off) inside the range.
        """
        config = self.noise_scheduler.config
        if config.get("clip_sample", False):
            return float(config.get("clip_sample_range", 1.0))
        if config.get("thresholding", False):
            return float(config.get("sample_max_value", 1.0))
        return None

    def _set_timesteps(self, device: torch.device) -> None:
        """``set_timesteps`` of the sampler, replayed from a snapshot while nothing changed.

        Setting up a schedule costs a few hundred microseconds of Python and numpy per call
        (as much as a small denoiser's step at batch 1). The first call with a given scheduler,
        number of steps and device saves the scheduler's state just after ``set_timesteps``;
        later calls restore that state (the multistep solvers keep their history in it).
        """
        scheduler, key = self.noise_scheduler, (self.num_inference_steps, device)
        cached = getattr(self, "_timesteps_cache", None)
        if cached is not None and cached[0] is scheduler and cached[1] == key:
            scheduler.__dict__.update(_copy_state(cached[2]))
            return
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        self._timesteps_cache = (scheduler, key, _copy_state(vars(scheduler)))

    def _film_conditions(self, timesteps: torch.Tensor, cond: torch.Tensor) -> list[Any]:
        """Every step's FiLM conditioning (B, film_dim), computed in one batched call.

        The step embedding and the observation features do not depend on the sample, so a
        denoiser with ``film_condition`` (the UNet) gets them for all steps before the loop.
        Returns a list of None for other denoisers.
        """
        denoiser = getattr(self.denoiser, "_orig_mod", self.denoiser)
        if not hasattr(denoiser, "film_condition"):
            return [None] * len(timesteps)
        S, B = len(timesteps), cond.shape[0]
        # Expand-and-flatten rather than repeat_interleave, which the torch.export-based ONNX
        # exporter lowered wrongly for a free batch size (see deploy/onnx_policy.py).
        film = denoiser.film_condition(
            timesteps.to(cond.device).view(S, 1).expand(S, B).reshape(S * B),  # (S * B,)
            cond.expand(S, *cond.shape).reshape(S * B, *cond.shape[1:]),  # (S * B, To, F)
        )
        return list(film.view(S, B, -1).unbind(0))  # S x (B, film_dim)

    def compile_sampling(self, whole_loop: bool = True) -> None:
        """Compiles sampling for static shapes (the compile happens on the next prediction).

        With a :class:`SamplerPlan` the whole denoising loop becomes one graph, the denoiser's
        calls and the solver's arithmetic included (the fastest at batch 1, but the compile
        takes minutes: every step's denoiser is compiled); otherwise, or with
        ``whole_loop=False``, the denoiser alone is compiled (once for all steps). On a GPU the
        denoiser is compiled and the whole loop captured as a CUDA graph
        (:class:`GraphedSampler`; seconds to a minute): there batch-1 sampling waits on kernel
        launches, which a replay removes. Call it again after moving the policy or changing
        its precision.
        """
        if whole_loop and self._planned():
            if next(self.denoiser.parameters()).is_cuda:
                self.denoiser.compile(dynamic=False)
                self._compiled_sample = GraphedSampler(self.sample_with_plan, self.sampler_plan)
            else:
                self._compiled_sample = torch.compile(self.sample_with_plan, dynamic=False)
        else:
            self.denoiser.compile(dynamic=False)

    def _planned(self) -> bool:
        """Whether sampling runs the plan (allowed, and the sampler has one)."""
        return self.use_sampler_plan and self.sampler_plan() is not None

    def sampler_plan(self) -> SamplerPlan | None:
        """The sampler's :class:`SamplerPlan` (cached), or None if it is not deterministic."""
        scheduler, steps = self.noise_scheduler, self.num_inference_steps
        cached = getattr(self, "_plan_cache", None)
        if cached is None or cached[0] is not scheduler or cached[1] != steps:
            cached = (scheduler, steps, plan_sampler(scheduler, steps))
            self._plan_cache = cached
        return cached[2]

    def sample_with_plan(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Denoises ``noise`` (B, T, Da) given ``cond`` (B, To, F) by the sampler's plan.

        No diffusers call happens here, so ``torch.compile`` captures the whole loop, the
        denoiser's calls included, as one graph (:func:`~diffusion_policy.deploy.warmup.
        compile_for_inference`).
        """
        plan = self.sampler_plan()
        if plan is None:
            raise ValueError(f"{type(self.noise_scheduler).__name__} has no sampler plan")
        timesteps = self._plan_timesteps(plan, cond.device)  # (S,)
        cond = cond.to(self.inference_dtype)
        films = self._film_conditions(timesteps, cond)  # S x (B, film_dim), or S x None
        return plan.run(lambda x, i: self._denoise(x, timesteps[i], cond, films[i]), noise)

    def _plan_timesteps(self, plan: SamplerPlan, device: torch.device) -> torch.Tensor:
        """The plan's timesteps (S,) on ``device``, made once: a copy from the host inside the
        loop would synchronize it, which a CUDA graph capture refuses."""
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            return torch.tensor(plan.timesteps, device=device)
        cached = getattr(self, "_plan_timesteps_cache", None)
        if cached is None or cached[0] is not plan or cached[1] != device:
            cached = (plan, device, torch.tensor(plan.timesteps, device=device))
            self._plan_timesteps_cache = cached
        return cached[2]

    def _denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, film: torch.Tensor | None
    ) -> torch.Tensor:
        """One sampling call of the denoiser in its inference dtype; the output in x's dtype."""
        inp = x.to(self.inference_dtype)
        if film is None:
            return self.denoiser(inp, t, cond).to(x.dtype)
        return self.denoiser(inp, t, cond, film=film).to(x.dtype)

    def set_inference_precision(self, precision: str) -> str:
        """Samples with the denoiser's weights in bf16 or fp32; for a deployed policy.

        ``bf16`` rounds the denoiser's weights to bfloat16 (half the bytes each call reads: what
        batch-1 sampling of a large UNet waits for); ``auto`` does so where the hardware
        multiplies bf16 natively (see :func:`~diffusion_policy.training.precision.
        choose_precision`), else keeps fp32. The samples and the solver's arithmetic stay
        float32. The rounding is not undone by ``fp32`` (that only converts the rounded weights
        back): convert a policy that is done training.

        Returns:
            The precision chosen, ``fp32`` or ``bf16``.
        """
        device = next(self.denoiser.parameters()).device
        chosen = resolve_precision(precision, device)
        self.inference_dtype = torch.bfloat16 if chosen == "bf16" else torch.float32
        self.denoiser.to(self.inference_dtype)
        self._compiled_sample = None  # a compiled loop is for the old dtype
        return chosen

    def _sample_with_scheduler(
        self, x: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Denoises ``x`` (B, T, Da) with the diffusers scheduler's own loop."""
        scheduler = self.noise_scheduler
        self._set_timesteps(cond.device)
        # Some schedulers (UniPC) draw no noise and take no generator.
        step_kwargs = {"generator": generator} if takes_generator(type(scheduler)) else {}
        timesteps = scheduler.timesteps  # (S,)
        cond = cond.to(self.inference_dtype)
        films = self._film_conditions(timesteps, cond)  # S x (B, film_dim), or S x None
        x = x * scheduler.init_noise_sigma  # 1 for variance-preserving schedulers
        for t, film in zip(timesteps, films, strict=True):
            model_input = scheduler.scale_model_input(x, t)  # identity unless sigma-scaled
            model_output = self._denoise(model_input, t, cond, film)
            x = scheduler.step(model_output, t, x, **step_kwargs).prev_sample
        return x

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
        cond = self.encode_obs(obs)  # (B, To, F)
        x = self.initial_noise(cond, generator)  # (B, T, Da)
        x = self.denoise(x, cond, generator)
        return self.actions_from_sample(x, self.action_offset(obs))

    def initial_noise(
        self, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The noise sampling starts from (B, T, Da): N(0, I), or the :class:`NoisePolicy`'s."""
        if self.noise_policy is not None:
            return self.noise_policy.sample(cond, generator).to(cond.dtype)
        return torch.randn(
            (cond.shape[0], self.horizon, self.action_dim),
            generator=generator,
            device=cond.device if generator is None else generator.device,
        ).to(device=cond.device, dtype=cond.dtype)

    def denoise(
        self, x: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Runs the sampler from the noise ``x`` (B, T, Da) given ``cond`` (B, To, F); returns
        the normalized sample (B, T, Da)."""
        if self._planned():
            return (self._compiled_sample or self.sample_with_plan)(x, cond)
        return self._sample_with_scheduler(x, cond, generator)

    def actions_from_sample(
        self, x: torch.Tensor, offset: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The denoised sample (B, T, Da), clipped, un-normalized and moved by ``offset``
        (:meth:`action_offset`): ``"action"``, the executed chunk (B, n_action_steps, Da) from
        the last observed step, and ``"action_pred"``, the whole horizon (B, T, Da)."""
        clip = self.clip_range()
        if clip is not None:
            x = x.clamp(-clip, clip)
        action_pred = self.normalizer.unnormalize_key(ACTION, x)  # (B, T, Da)
        if offset is not None:
            action_pred = action_pred + offset
        start = self.n_obs_steps - 1
        return {
            ACTION: action_pred[:, start : start + self.n_action_steps],
            "action_pred": action_pred,
        }


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a scheduler's attributes; its lists (the solvers' history) copied too."""
    return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}


def _check_steps(num_inference_steps: int | None) -> int | None:
    """Returns ``num_inference_steps`` if it is None or >= 1; 0 must not mean "the default"."""
    if num_inference_steps is not None and num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be >= 1 (or None for the "
            f"scheduler's number of training steps)"
        )
    return num_inference_steps
