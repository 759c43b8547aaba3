"""The RL fine-tuning loop: rollouts with the stochastic chain, GAE, PPO, evaluation, checkpoints.

A checkpoint it writes is a policy checkpoint (``model``, ``config``, ``shape_meta``) that
:func:`~diffusion_policy.training.builders.load_policy`, ``scripts/eval.py`` and the policy
server read as any other, plus a ``finetune`` entry (critic, optimizers, the frozen initial
denoiser, counters) from which a run resumes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.policies.noise_policy import NoisePolicy
from diffusion_policy.rl.chain import DenoisingChain, ddim_config
from diffusion_policy.rl.critic import ValueMLP
from diffusion_policy.rl.gae import gae
from diffusion_policy.rl.ppo import PPOBatch, PPOConfig, ppo_update
from diffusion_policy.rl.rollouts import Rollout, collect, make_chunk_envs
from diffusion_policy.rl.steering import NoiseSteering
from diffusion_policy.training.builders import load_policy, resolve_device
from diffusion_policy.training.checkpoint import load_checkpoint, save_checkpoint
from diffusion_policy.training.logger import RunLogger
from diffusion_policy.training.run_dir import LATEST, RunFolderLock, find_resume_checkpoint
from diffusion_policy.training.sampling import TRAINED_KEYS, sampling_scheduler
from diffusion_policy.training.seeding import seed_everything
from diffusion_policy.training.stored_config import instantiate_stored
from diffusion_policy.training.time_budget import TimeBudget

log = logging.getLogger(__name__)

BEST = "best.ckpt"


class FineTuner:
    """Fine-tunes a trained diffusion policy with DPPO; see ``configs/finetune/finetune.yaml``.

    Args:
        cfg: The composed fine-tuning config.
        run_dir: The run folder (checkpoints, ``logs.jsonl``, W&B files).
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock = RunFolderLock(self.run_dir)
        self.lock.acquire()
        try:
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        for key, low in (("n_iterations", 0), ("eval_every", 0), ("checkpoint_every", 1)):
            if cfg[key] < low:
                raise ValueError(f"{key}={cfg[key]} must be >= {low}")
        self.device = resolve_device(str(cfg.device))
        seed_everything(cfg.seed)
        resume_from = find_resume_checkpoint(self.run_dir, bool(cfg.resume))
        source = resume_from or Path(cfg.checkpoint)
        # A fine-tuning checkpoint holds the fine-tuned weights as "model" (no EMA).
        self.policy, self.policy_cfg = load_policy(
            source,
            device=self.device,
            use_ema=bool(cfg.use_ema) and resume_from is None,
            trusted_targets=list(cfg.trusted_targets),
        )
        self.policy.requires_grad_(False)
        feature_dim = self.policy.n_obs_steps * self.policy.encoder.output_dim
        ccfg = cfg.chain
        if cfg.actor == "chain":  # DPPO: the denoiser's last steps
            self.actor = DenoisingChain(
                self.policy,
                num_steps=ccfg.num_steps,
                ft_steps=ccfg.ft_denoising_steps,
                eta=ccfg.eta,
                min_std=ccfg.min_std,
                logprob_min_std=ccfg.logprob_min_std,
                log_prob=ccfg.log_prob,
            ).to(self.device)
            trained = self.policy.denoiser
        elif cfg.actor == "noise":  # DSRL: the initial noise; a resumed run has its own
            if self.policy.noise_policy is None:
                self._attach_noise_policy(feature_dim)
            self.actor = NoiseSteering(self.policy)
            trained = self.policy.noise_policy
        else:
            raise ValueError(f"actor={cfg.actor!r} must be 'chain' or 'noise'")
        trained.requires_grad_(True)
        if cfg.sampler == "chain":
            self._deploy_chain_sampler(ccfg.num_steps or self.policy.num_train_timesteps)
        elif cfg.sampler != "policy":
            raise ValueError(f"sampler={cfg.sampler!r} must be 'chain' or 'policy'")
        self.critic = ValueMLP(feature_dim, list(cfg.critic.hidden_dims)).to(self.device)
        self.actor_opt = torch.optim.Adam(
            self._actor_param_groups(trained), lr=cfg.optimizer.actor_lr
        )
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.optimizer.critic_lr)
        self.ppo = PPOConfig(**OmegaConf.to_container(cfg.ppo, resolve=True))
        self.clock = TimeBudget(cfg.max_minutes)
        self.iteration, self.env_steps, self.best_score = 0, 0, -math.inf

        rcfg = cfg.rollout
        self._check_seeds()
        self.n_decisions = -(-rcfg.max_steps // self.policy.n_action_steps)
        self.envs = make_chunk_envs(
            instantiate(cfg.env),
            rcfg.n_envs,
            self.policy.n_obs_steps,
            self.policy.n_action_steps,
            rcfg.max_steps,
            success_bonus=rcfg.success_bonus,
            fill_after_success=rcfg.fill_after_success,
        )
        self.runner = self._make_runner() if cfg.eval_every > 0 else None
        if resume_from is not None:
            self._load(resume_from)
        lcfg = cfg.logger
        self.logger = RunLogger(
            self.run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            mode=lcfg.mode,
            project=lcfg.project,
            group=lcfg.group,
            name=lcfg.name,
            tags=list(lcfg.tags),
            resume=resume_from is not None,
            resume_step=self.iteration if resume_from is not None else None,
        )

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> float | None:
        """Fine-tunes until ``n_iterations`` or ``max_minutes``; returns the best test score."""
        cfg = self.cfg
        try:
            if self.iteration == 0 and self.runner is not None:
                self._evaluate()  # the initial (behavior-cloned) policy's score, at step 0
            self.clock.start()
            while self.iteration < cfg.n_iterations and not self.clock.exhausted:
                metrics = self._iterate()
                self.iteration += 1
                self.logger.log(metrics, step=self.iteration)
                log.info(
                    "iteration %d: return %.3f, success %.2f, approx_kl %.2e, value_loss %.3g",
                    self.iteration,
                    metrics["train/return"],
                    metrics["train/success_rate"],
                    metrics.get("ppo/approx_kl", 0.0),
                    metrics.get("ppo/value_loss", 0.0),
                )
                if self.runner is not None and self.iteration % cfg.eval_every == 0:
                    self._evaluate()
                if self.iteration % cfg.checkpoint_every == 0:
                    self._save(self.ckpt_dir / LATEST)
            self.clock.stop()
            self._save(self.ckpt_dir / LATEST)
        finally:
            self.envs.close()
            self.logger.finish()
            self.lock.release()
        return self.best_score if math.isfinite(self.best_score) else None

    def _iterate(self) -> dict[str, float]:
        """One iteration: an episode per env with the stochastic chain, then a PPO update."""
        cfg, rcfg = self.cfg, self.cfg.rollout
        tic = time.perf_counter()
        # Seeded by the iteration: a resumed run draws what the original would have.
        gen = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.iteration)
        first = rcfg.train_start_seed + self.iteration * rcfg.n_envs
        seeds = list(range(first, first + rcfg.n_envs))
        self.policy.eval()
        rollout = collect(self.envs, self.actor, self.critic, seeds, self.n_decisions, gen)
        rollout_s = time.perf_counter() - tic
        batch = self._ppo_batch(rollout)
        perm_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.iteration)
        stats = ppo_update(
            self.actor,
            self.critic,
            self.actor_opt,
            self.critic_opt,
            batch,
            self.ppo,
            perm_gen,
            train_actor=self.iteration >= self.ppo.critic_warmup,
        )
        self.env_steps += rollout.env_steps
        eps = rollout.episodes
        return {
            "train/return": _mean(eps["return"]),
            "train/mean_score": _mean(eps["score"]),
            "train/success_rate": _mean(eps["success"]),
            "train/n_decisions": float(len(batch.advantages)),
            **{f"ppo/{k}": v for k, v in stats.items()},
            "env_steps": float(self.env_steps),
            "time/rollout_s": rollout_s,
            "time/update_s": time.perf_counter() - tic - rollout_s,
            "time/budget_spent_s": self.clock.spent,
        }

    def _ppo_batch(self, rollout: Rollout) -> PPOBatch:
        """Advantages by GAE over the decisions, flattened to the valid ones."""
        rcfg = self.cfg.rollout
        advantages, returns = gae(
            rollout.rewards * rcfg.reward_scale,
            rollout.values,
            rollout.last_values,
            rollout.dones.float(),
            gamma=rcfg.gamma,
            lam=rcfg.lam,
        )  # (N, E) each
        valid = rollout.valid  # (N, E)
        return PPOBatch(
            cond=rollout.cond[valid],  # (M, To, F)
            elapsed=rollout.elapsed[valid],  # (M,)
            samples=rollout.samples[valid],  # (M, K + 1, T, Da)
            log_probs=rollout.log_probs[valid],  # (M, K)
            advantages=advantages[valid],
            returns=returns[valid],
        )

    def _evaluate(self) -> None:
        """Scores the policy's own (deterministic, deployed) sampler on the test seeds; saves
        ``best.ckpt`` when ``best_metric`` beats its best so far."""
        with self.clock.paused():
            result = self.runner.run(self.policy)
        metrics = {f"eval/{k}": v for k, v in result.items() if isinstance(v, int | float)}
        self.logger.log(metrics, step=self.iteration)
        metric = self.cfg.best_metric
        if metric not in result:
            scalars = sorted(k for k, v in result.items() if isinstance(v, int | float))
            raise ValueError(f"best_metric={metric!r} is not among the evaluation's {scalars}")
        score = float(result[metric])
        log.info("eval at iteration %d: %s %.3f", self.iteration, metric, score)
        if score > self.best_score:
            self.best_score = score
            self._save(self.ckpt_dir / BEST)

    # -- setup helpers -------------------------------------------------------------------------
    def _deploy_chain_sampler(self, num_steps: int) -> None:
        """Evaluates and saves the policy with deterministic DDIM on the chain's timesteps.

        Fine-tuning trains the denoiser at the chain's timesteps only; the sampler that uses
        exactly those (the chain without its noise) is the one to deploy. The policy's config
        is updated too, so the checkpoints written here load with that sampler.
        """
        trained = self.policy_cfg.noise_scheduler
        requested = ddim_config(self.policy)
        self.policy.set_sampler(sampling_scheduler(trained, requested), num_steps)
        stored = OmegaConf.to_container(trained, resolve=True)
        kept = {k: stored[k] for k in TRAINED_KEYS if k in stored}
        self.policy_cfg.noise_scheduler = {**requested, **kept}
        self.policy_cfg.policy.num_inference_steps = num_steps
        log.info("sampler: deterministic DDIM on the chain's %d timesteps", num_steps)
        chain = self.actor
        if isinstance(chain, DenoisingChain) and chain.ft_steps < chain.num_steps:
            # The chain runs its first steps with the frozen initial denoiser; the deployed
            # sampler runs the fine-tuned one there, at steps PPO never scored.
            log.warning(
                "chain.ft_denoising_steps=%d < chain.num_steps=%d: the deployed sampler runs "
                "the fine-tuned denoiser at %d steps that fine-tuning does not train",
                chain.ft_steps,
                chain.num_steps,
                chain.num_steps - chain.ft_steps,
            )

    def _actor_param_groups(self, trained: torch.nn.Module) -> list[dict[str, Any]]:
        """The trained module's parameters; a noise policy's ``log_std`` at
        ``optimizer.std_lr`` when set (Adam moves a parameter by about its lr per step, so the
        std would otherwise change by ~0.1% per step)."""
        std_lr = self.cfg.optimizer.get("std_lr")
        if not isinstance(trained, NoisePolicy) or std_lr is None:
            return [{"params": list(trained.parameters())}]
        rest = [p for name, p in trained.named_parameters() if name != "log_std"]
        return [{"params": rest}, {"params": [trained.log_std], "lr": float(std_lr)}]

    def _attach_noise_policy(self, feature_dim: int) -> None:
        """Gives the policy a :class:`NoisePolicy` (N(0, I) until trained), in its config too,
        so that the checkpoints written here load with it."""
        policy = self.policy
        settings = OmegaConf.to_container(self.cfg.noise_policy, resolve=True)
        noise_policy = NoisePolicy.from_config(
            settings, feature_dim, policy.horizon, policy.action_dim
        )
        policy.noise_policy = noise_policy.to(self.device)
        self.policy_cfg.policy.noise_policy = noise_policy.config()

    def _make_runner(self) -> Any:
        """The policy's EnvRunner from its stored config, with ``eval`` settings merged over."""
        stored = OmegaConf.to_container(self.policy_cfg.env_runner, resolve=True)
        overrides = {k: v for k, v in self.cfg.eval.items() if v is not None}
        return instantiate_stored(
            {**stored, **overrides},
            "env_runner",
            trusted=list(self.cfg.trusted_targets),
            progress=False,
            output_dir=str(self.run_dir / "media"),
        )

    def _check_seeds(self) -> None:
        """Training episodes must not reuse the test seeds the evaluation reports."""
        rcfg, ecfg = self.cfg.rollout, self.cfg.eval
        test_start = ecfg.test_start_seed if ecfg.test_start_seed is not None else 100000
        n_test = ecfg.n_test if ecfg.n_test is not None else 50
        first = rcfg.train_start_seed
        last = first + self.cfg.n_iterations * rcfg.n_envs
        if first < test_start + n_test and test_start < last:
            raise ValueError(
                f"rollout.train_start_seed={first} gives training seeds {first}..{last - 1}, "
                f"which overlap the test seeds {test_start}..{test_start + n_test - 1}"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, path: Path) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.policy.state_dict(),
            "ema": None,
            "config": OmegaConf.to_container(self.policy_cfg, resolve=True),
            "shape_meta": self.policy.shape_meta,
            "finetune": {
                "base_denoiser": (
                    self.actor.base_denoiser.state_dict()
                    if isinstance(self.actor, DenoisingChain)
                    else None  # the noise actor has none
                ),
                "critic": self.critic.state_dict(),
                "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(),
                "iteration": self.iteration,
                "env_steps": self.env_steps,
                "best_score": self.best_score if math.isfinite(self.best_score) else None,
                "clock": self.clock.state_dict(),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            },
        }
        save_checkpoint(path, state)
        self.logger.sync()

    def _load(self, path: Path) -> None:
        """Restores the run's state from a fine-tuning checkpoint (the policy is loaded)."""
        state = load_checkpoint(path, map_location=self.device)["finetune"]
        if isinstance(self.actor, DenoisingChain):
            self.actor.base_denoiser.load_state_dict(state["base_denoiser"])
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])
        best = state["best_score"]
        self.best_score = -math.inf if best is None else float(best)
        self.clock.load_state_dict(state["clock"])
        log.info("resumed %s at iteration %d", path, self.iteration)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
