"""The stochastic denoising chain of a diffusion policy, and its log-likelihood.

Sampling with DDPM (or DDIM with ``eta > 0``) draws every intermediate sample from a Gaussian,
``x_{k-1} ~ N(mu_theta(x_k, k, obs), sigma_k^2 I)``, so a whole chain ``x_S, ..., x_0`` has a
likelihood: the product of its steps' Gaussian densities. That makes the chain a policy in the
RL sense whose log-probability is differentiable in the denoiser's weights (DPPO, Ren et al.
2024). Each step here is the DDIM update with stochasticity ``eta`` over the sampler's timesteps
(``eta = 1`` over all training steps is DDPM's posterior, ``variance_type="fixed_small"``):

    eps_hat = the noise the denoiser predicts at x_k (or derived from its x0 or v prediction)
    x0_hat  = (x_k - sqrt(1 - a_k) eps_hat) / sqrt(a_k), clamped where the policy's sampler
              clamps (clip_sample, or thresholding)
    sigma_k = eta * sqrt((1 - a_prev) / (1 - a_k)) * sqrt(1 - a_k / a_prev)
    mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_k^2) eps_hat
    std     = max(sigma_k, min_std)                when sampling
    std     = max(sigma_k, logprob_min_std)        when scoring

with ``a`` the cumulative alphas. The standard deviation is clipped from below by ``min_std`` so
that exploration never vanishes (the last step's ``sigma`` is 0), and every log-density is
computed with a bound ``logprob_min_std`` (DPPO's two bounds): a larger one there keeps PPO's
ratios from swinging with tiny changes of the mean. Only the last ``ft_steps`` steps are
fine-tuned (and scored); a frozen copy of the initial denoiser runs the earlier ones.

What PPO's ratio compares is each step's log-density reduced one of two ways (``log_prob``):
``"sum"`` over the whole chunk (T, Da), the exact log-likelihood; or ``"executed_mean"``, the
mean per element over the actions the env executes (DPPO's). A sum over 32 elements moves the
ratio ~32 times as far for the same change of the mean, so a clip range of 0.01 set for the
mean clips most of the batch (measured on Push-T: 70% of pairs clipped), and the horizon's
unexecuted tail, which no reward scores, adds its noise to every ratio.

The chain works on the policy's public parts (``denoiser``, ``noise_scheduler``, ``normalizer``,
``encode_obs``) and leaves the policy's own sampler, the one deployed, untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffusion_policy.policies.diffusion_policy import DiffusionPolicy
from diffusion_policy.policies.noise_policy import gaussian_log_density

LOG_PROB_MODES = ("sum", "executed_mean")


@dataclass
class ChainSample:
    """A batch of sampled chains; the fine-tuned part is what PPO needs.

    Attributes:
        action: The final sample, unnormalized and clamped if the scheduler clips (B, T, Da).
        samples: The fine-tuned steps' inputs and the final sample, x_K..x_0 (B, K + 1, T, Da),
            normalized: step ``j`` maps ``samples[:, j]`` to ``samples[:, j + 1]``.
        log_probs: Each fine-tuned step's log-density, reduced as the chain's ``log_prob``
            says (B, K).
    """

    action: torch.Tensor
    samples: torch.Tensor
    log_probs: torch.Tensor


def ddim_config(policy: DiffusionPolicy) -> dict[str, Any]:
    """A diffusers DDIM config whose deterministic steps are a chain's with ``eta = 0``.

    Same timesteps (``trailing`` spacing over the chain's ``num_steps``), same clamp of the
    clean sample, and a last step to the clean sample (``set_alpha_to_one``). The noise
    schedule's own keys (``num_train_timesteps``, betas, ``prediction_type``) are the policy's,
    to be added from its config (:func:`~diffusion_policy.training.sampling.sampling_scheduler`).
    """
    clip = policy.clip_range()
    return {
        "_target_": "diffusers.DDIMScheduler",
        "clip_sample": clip is not None,
        "clip_sample_range": 1.0 if clip is None else clip,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
    }


class DenoisingChain(nn.Module):
    """Samples a policy's denoising chain stochastically and scores its fine-tuned steps.

    Args:
        policy: The diffusion policy; its ``denoiser`` is the one fine-tuned.
        num_steps: Denoising steps of the chain (evenly spaced training timesteps, the last one
            first); None uses every training step (DDPM).
        ft_steps: How many of the last steps are fine-tuned (0..num_steps).
        eta: Stochasticity of each step, in (0, 1]; 1 is DDPM's posterior variance.
        min_std: Lower bound of every step's standard deviation when sampling (> 0): the
            exploration noise.
        logprob_min_std: Lower bound of the standard deviation the log-densities are computed
            with (> 0); None uses ``min_std``. Larger than ``min_std``, it makes PPO's ratios
            less sensitive to small changes of the mean (DPPO's separate bounds).
        log_prob: How a step's log-density is reduced over the chunk (see the module
            docstring): ``"sum"`` or ``"executed_mean"``.

    Raises:
        ValueError: A value out of range, naming it.
    """

    def __init__(
        self,
        policy: DiffusionPolicy,
        num_steps: int | None = None,
        ft_steps: int = 10,
        eta: float = 1.0,
        min_std: float = 0.1,
        logprob_min_std: float | None = None,
        log_prob: str = "sum",
    ) -> None:
        super().__init__()
        n_train = policy.num_train_timesteps
        num_steps = n_train if num_steps is None else num_steps
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={n_train}]")
        if not 0 <= ft_steps <= num_steps:
            raise ValueError(f"ft_steps={ft_steps} must be in [0, num_steps={num_steps}]")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta={eta} must be in (0, 1]")
        logprob_min_std = min_std if logprob_min_std is None else logprob_min_std
        for name, value in (("min_std", min_std), ("logprob_min_std", logprob_min_std)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be > 0")
        if log_prob not in LOG_PROB_MODES:
            raise ValueError(f"log_prob={log_prob!r} must be one of {LOG_PROB_MODES}")
        self.policy = policy
        # The frozen initial denoiser runs the steps that are not fine-tuned (and anchors the
        # optional KL penalty); it is not a submodule, so the policy's state dict is unchanged.
        self._base = [copy.deepcopy(policy.denoiser).requires_grad_(False).eval()]
        self.ft_steps = ft_steps
        self.eta = eta
        self.min_std = min_std
        self.logprob_min_std = logprob_min_std
        self.log_prob = log_prob
        # The executed actions of a predicted chunk, as predict_action slices them.
        start = policy.n_obs_steps - 1
        self.executed = slice(start, start + policy.n_action_steps)
        # Training timesteps, the noisiest first, e.g. 99, 89, ..., 9 for 10 of 100.
        step = n_train / num_steps
        timesteps = [round(n_train - 1 - i * step) for i in range(num_steps)]
        self.register_buffer("timesteps", torch.tensor(timesteps), persistent=False)  # (S,)
        next_timestep = torch.full((n_train,), -1)  # training timestep -> the chain's next
        next_timestep[timesteps[:-1]] = torch.tensor(timesteps[1:], dtype=torch.long)
        self.register_buffer("next_timestep", next_timestep, persistent=False)  # (n_train,)
        # The bound the policy's own sampler keeps clean samples in (clip_sample, or the
        # multistep solvers' thresholding): unclamped, x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        # explodes at the noisiest steps, where sqrt(a) is near 0.
        self.clip = policy.clip_range()
        self.prediction_type = policy.noise_scheduler.config.prediction_type

    @property
    def base_denoiser(self) -> nn.Module:
        """The frozen copy of the denoiser as it was when the chain was made."""
        return self._base[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def ft_timesteps(self) -> torch.Tensor:
        """The fine-tuned steps' timesteps (K,), in chain order."""
        return self.timesteps[self.num_steps - self.ft_steps :]

    def _alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative alphas at ``t`` (B,) and at the chain's next timestep (1 after the last)."""
        a = self.policy.alphas_cumprod(like)  # (num_train_timesteps,)
        nxt = self.next_timestep.to(t.device)[t]  # (B,), -1 after the last step
        a_prev = torch.where(nxt >= 0, a[nxt.clamp_min(0)], torch.ones_like(a[t]))
        return a[t], a_prev

    def gaussian(
        self, denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of ``x_{k-1}`` given ``x_k``.

        Args:
            denoiser: The network to use (the policy's, or :attr:`base_denoiser`).
            x: Normalized samples x_k (B, T, Da).
            t: Their training timesteps (B,), each one of the chain's.
            cond: The observation features (B, To, F).

        Returns:
            ``mean`` (B, T, Da) and the step's own ``sigma`` (B, 1, 1), before the lower
            bounds (``min_std``, ``logprob_min_std``) the callers apply.
        """
        a_t, a_prev = self._alphas(t, x)  # (B,), (B,)
        a_t, a_prev = a_t.view(-1, 1, 1), a_prev.view(-1, 1, 1)
        out = denoiser(x, t, cond)  # (B, T, Da)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            raise ValueError(f"unsupported prediction_type={self.prediction_type!r}")
        # As diffusers' DDIM: the clean sample is clamped, the noise estimate is not, so the
        # chain without its noise is that sampler step for step (see ddim_config).
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        sigma = self.eta * var.clamp_min(0).sqrt()  # (B, 1, 1)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        return mean, sigma

    def step_log_prob(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        x_prev: torch.Tensor,
        cond: torch.Tensor,
        denoiser: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log N(x_prev; mu(x, t, cond), std^2), reduced over (T, Da) as ``log_prob`` says,
        with ``std = max(sigma, logprob_min_std)``.

        Args:
            x: Step inputs (B, T, Da).
            t: Their timesteps (B,).
            x_prev: Step outputs (B, T, Da).
            cond: Observation features (B, To, F).
            denoiser: The network; the policy's (fine-tuned) one if None.

        Returns:
            ``log_prob`` (B,), ``mean`` (B, T, Da) and ``std`` (B, 1, 1).
        """
        mean, sigma = self.gaussian(denoiser or self.policy.denoiser, x, t, cond)
        std = self._scoring_std(sigma)
        return self._log_density(x_prev, mean, std), mean, std

    def kl_to_base(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over the batch of KL(N(mean, std^2) || the initial denoiser's step), summed over
        the chunk; ``mean`` and ``std`` are :meth:`step_log_prob`'s at (x, t, cond).

        Both steps have the same std: KL = |mean - mean_0|^2 / (2 std^2).
        """
        with torch.no_grad():
            base_mean, _ = self.gaussian(self.base_denoiser, x, t, cond)
        return ((mean - base_mean) ** 2 / (2 * std**2)).flatten(1).sum(1).mean()

    def _scoring_std(self, sigma: torch.Tensor) -> torch.Tensor:
        """The std the log-densities use: the step's ``sigma`` bounded below by
        ``logprob_min_std``. Sampling and PPO's update both score with it, so their ratios start
        at 1."""
        return sigma.clamp_min(self.logprob_min_std)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        offset: torch.Tensor | None = None,
    ) -> ChainSample:
        """Samples one chain per condition.

        Args:
            cond: Observation features (B, To, F), from ``policy.encode_obs``.
            generator: Random generator (on ``cond``'s device) for reproducible chains.
            offset: The policy's relative-action origin (B, 1, Da), ``policy.action_offset``;
                None for absolute actions.

        Returns:
            The :class:`ChainSample`.
        """
        policy = self.policy
        B = cond.shape[0]
        shape = (B, policy.horizon, policy.action_dim)
        x = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        first_ft = self.num_steps - self.ft_steps
        samples, log_probs = [], []
        for k, t in enumerate(self.timesteps.to(cond.device)):
            tt = t.expand(B)  # (B,)
            fine_tuned = k >= first_ft
            denoiser = policy.denoiser if fine_tuned else self.base_denoiser
            mean, sigma = self.gaussian(denoiser, x, tt, cond)
            noise = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
            x_prev = mean + sigma.clamp_min(self.min_std) * noise
            if fine_tuned:
                samples.append(x)
                log_probs.append(self._log_density(x_prev, mean, self._scoring_std(sigma)))
            x = x_prev
        samples.append(x)
        # The policy's own clip, un-normalization and origin: the actions its sampler would give.
        action = policy.actions_from_sample(x, offset)["action_pred"]  # (B, T, Da)
        return ChainSample(
            action=action,
            samples=torch.stack(samples, 1),  # (B, K + 1, T, Da)
            log_probs=torch.stack(log_probs, 1) if log_probs else cond.new_zeros(B, 0),  # (B, K)
        )

    def chain_log_prob(self, samples: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Each fine-tuned step's log-density of given chains under the current denoiser.

        Args:
            samples: x_K..x_0 of the fine-tuned steps (B, K + 1, T, Da).
            cond: Observation features (B, To, F).

        Returns:
            (B, K) log-densities, differentiable in the denoiser's weights.
        """
        B, K = samples.shape[0], samples.shape[1] - 1
        if self.ft_steps != K:
            raise ValueError(f"samples hold {K} steps, the chain fine-tunes {self.ft_steps}")
        t = self.ft_timesteps().to(samples.device).repeat(B)  # (B * K,)
        x = samples[:, :-1].flatten(0, 1)  # (B * K, T, Da)
        x_prev = samples[:, 1:].flatten(0, 1)
        cond_k = cond.repeat_interleave(K, 0)  # (B * K, To, F)
        log_prob, _, _ = self.step_log_prob(x, t, x_prev, cond_k)
        return log_prob.view(B, K)

    def _log_density(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, std^2) of chunks (B, T, Da), reduced as ``log_prob`` says: (B,)."""
        per_element = gaussian_log_density(x, mean, std)  # (B, T, Da)
        if self.log_prob == "sum":
            return per_element.flatten(1).sum(1)
        return per_element[:, self.executed].flatten(1).mean(1)
