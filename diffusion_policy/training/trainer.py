"""The one trainer: optimization, EMA, validation, rollouts, checkpoints and logging.

The run's parts are built in ``setup.py``, ``loader.py`` and ``resume.py``; here is the loop.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from diffusion_policy.training.builders import action_origin, resolve_device
from diffusion_policy.training.checkpoint import (
    CheckpointWriteError,
    TopKCheckpoints,
    save_checkpoint,
    warn_if_low_disk,
)
from diffusion_policy.training.config_checks import check_config, check_device
from diffusion_policy.training.distributed import (
    barrier,
    gather_objects,
    init_distributed,
    mean_across_ranks,
)
from diffusion_policy.training.interrupt import StopSignals, TrainingInterrupted
from diffusion_policy.training.loader import (
    batches,
    count_steps_per_epoch,
    make_loader,
    make_train_sampler,
)
from diffusion_policy.training.logger import RunLogger
from diffusion_policy.training.nonfinite import (
    NonFiniteLossError,
    NonFiniteWeightsError,
    SkippedSteps,
    check_finite_weights,
)
from diffusion_policy.training.optim import build_optimizer
from diffusion_policy.training.precision import autocast
from diffusion_policy.training.resume import check_ranks_agree, load_training_state, open_run_folder
from diffusion_policy.training.run_dir import LATEST, RunFolderLock
from diffusion_policy.training.seeding import (
    rank_seed,
    resume_rng_state,
    rng_state,
    seed_everything,
)
from diffusion_policy.training.setup import (
    build_data,
    build_lr_scheduler,
    build_policy_and_ema,
    checkpoint_bytes,
    per_rank_batch_size,
)
from diffusion_policy.training.time_budget import TimeBudget

log = logging.getLogger(__name__)

# The non-finite errors are raised from here: callers catch them as the trainer's.
__all__ = ["NonFiniteLossError", "NonFiniteWeightsError", "Trainer"]


class Trainer:
    """Trains a :class:`DiffusionPolicy` as the config says, in the run folder ``run_dir``.

    Launched by ``torchrun``, it trains data-parallel: each rank trains on its own shard of
    every epoch with ``trainer.batch_size / world_size`` samples per step (the config's batch
    size is the global one), DDP averages the gradients, and rank 0 alone validates, rolls out,
    logs and writes checkpoints. Every rank resumes from the same ``latest.ckpt``.

    Rank 0 holds a lock on the run folder from construction until :meth:`train` ends (or
    :meth:`close`): a second process on the same folder fails at once.

    Args:
        cfg: The composed run config (see ``configs/train.yaml``).
        run_dir: Folder for checkpoints, logs, media and the resolved config; the same folder
            on every rank.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock = RunFolderLock(self.run_dir)
        self.stop = StopSignals()
        self.logger: RunLogger | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, tcfg = self.cfg, self.tcfg
        check_config(cfg)
        check_device(cfg.device)
        # Under torchrun: this process's rank, and its GPU (cuda:LOCAL_RANK).
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.batch_size = per_rank_batch_size(tcfg.batch_size, self.dist.world_size)
        resume = open_run_folder(cfg, self.run_dir, self.lock, self.dist.is_main)
        # The same seed on every rank: the same split and initial weights.
        seed_everything(cfg.seed)
        self.dataset, self.val_dataset, self.shape_meta = build_data(cfg, self.dist)
        self._build_model()
        self._build_schedule()
        self.env_runner = (
            instantiate(cfg.env_runner, output_dir=str(self.run_dir / "media"))
            if tcfg.rollout_every and self.dist.is_main
            else None
        )
        self.topk = TopKCheckpoints(self.ckpt_dir, k=tcfg.topk)
        self._start_counters()
        if resume is not None:
            self._load_state(*resume)
        if cfg.resume:
            check_ranks_agree(self.global_step, self.dist, self.run_dir)
        if self.dist.is_main:
            self.logger = RunLogger(
                self.run_dir,
                config=OmegaConf.to_container(cfg, resolve=True),
                resume=resume is not None,
                resume_step=self.global_step if resume is not None else None,
                **cfg.logger,
            )
        self._log_start()

    def _build_model(self) -> None:
        """The policy, its EMA, the optimizer, and the model that trains (DDP across ranks)."""
        cfg, tcfg = self.cfg, self.tcfg
        self.policy, self.ema = build_policy_and_ema(
            cfg, self.shape_meta, self.dataset.get_normalizer_data(action_origin(cfg)), self.device
        )
        if self.dist.is_main:
            warn_if_low_disk(self.ckpt_dir, (tcfg.topk + 2) * checkpoint_bytes(self.policy))
        self.optimizer = build_optimizer(cfg.optimizer, self.policy)
        # Training calls `self.model`: the policy, or across ranks the policy in DDP, whose
        # backward averages the gradients. Evaluation and checkpoints use `self.policy`.
        self.model: torch.nn.Module = self.policy
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.policy, device_ids=device_ids)
        # Each rank draws its own diffusion noise and timesteps.
        torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))

    def _build_schedule(self) -> None:
        """This rank's batches, the steps per epoch, the time budget and the LR schedule."""
        cfg, tcfg = self.cfg, self.tcfg
        self.train_sampler = make_train_sampler(self.dataset, self.dist, cfg.seed, self.batch_size)
        self.train_loader = self._loader(self.dataset, self.train_sampler)
        self.steps_per_epoch = count_steps_per_epoch(self.train_loader, tcfg)
        # With trainer.max_minutes the run ends on time and the learning rate follows the
        # schedule over the fraction of the budget spent; otherwise over num_epochs.
        self.clock = TimeBudget(tcfg.get("max_minutes"))
        self.lr_scheduler = build_lr_scheduler(
            cfg, self.optimizer, self.clock, self.steps_per_epoch
        )

    def _start_counters(self) -> None:
        self.epoch = 0  # epochs done
        self.epoch_step = 0  # batches done in the current epoch (a mid-epoch checkpoint)
        self.global_step = 0
        self.best_score: float | None = None  # the run's best test/mean_score so far
        self.skipped = SkippedSteps(
            self.tcfg.max_nonfinite_steps, self.ckpt_dir / LATEST, self.run_dir
        )
        self.out_of_time = False  # the time budget ran out (the same on every rank)
        self._stopping = False  # a stop signal reached some rank (the same on every rank)

    def _log_start(self) -> None:
        log.info(
            "policy: %.2fM parameters; %d train / %d val windows; device %s; rank %d of %d",
            sum(p.numel() for p in self.policy.parameters()) / 1e6,
            len(self.dataset),
            len(self.val_dataset),
            self.device,
            self.dist.rank,
            self.dist.world_size,
        )

    def close(self) -> None:
        """Releases the run folder (:meth:`train` does this when it ends)."""
        self.lock.release()

    # -- resuming -----------------------------------------------------------------------------
    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        """Continues the run of checkpoint ``state``, read from ``path``."""
        load_training_state(path, state, self.policy, self.ema, self.optimizer, self.lr_scheduler)
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state.get("epoch_step", 0))
        self.global_step = int(state["global_step"])
        self.best_score = state.get("best_score")
        if state.get("clock"):
            self.clock.load_state_dict(state["clock"])
        # Each rank continues its own random stream.
        resume_rng_state(state.get("rng_states") or [], self.dist, self.device, path)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    # -- data ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, sampler: Sampler[int] | None = None) -> DataLoader:
        """Batches of ``self.batch_size`` (per rank); in order without a sampler."""
        return make_loader(dataset, self.batch_size, self.tcfg, self.device, sampler)

    # -- loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Runs the remaining epochs; returns the last epoch's metrics.

        Only rank 0 has evaluation metrics; :attr:`best_score` holds the run's best test score.
        On SIGINT or SIGTERM the current step finishes, ``latest.ckpt`` is written and
        :class:`TrainingInterrupted` is raised. The run folder is released however it ends.
        """
        try:
            with self.stop:
                return self._train()
        finally:
            self.close()

    def _train(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.clock.start()
        for epoch in range(self.epoch, self.tcfg.num_epochs):
            metrics = {"epoch": epoch, "train/loss_epoch": self._train_epoch(epoch)}
            if self._stopping:  # a signal mid-epoch: save where it stopped
                self._save_checkpoints({})
                raise self._interrupted(epoch)
            metrics["train/skipped_steps"] = self.skipped.in_epoch
            # The last epoch: by count, or cut short when the time budget ran out.
            last = epoch == self.tcfg.num_epochs - 1 or self.out_of_time

            # Rank 0 alone evaluates; the other ranks wait for it at the next all-reduce.
            if self.dist.is_main and self._due(self.tcfg.val_every, epoch, last):
                metrics["val/loss"] = self._validate()
            metrics["train/minutes"] = self.clock.spent / 60  # training time, rollouts excluded
            if self.env_runner is not None and self._due(self.tcfg.rollout_every, epoch, last):
                with self.clock.paused():
                    metrics.update(self._rollout(epoch))

            self.epoch, self.epoch_step = epoch + 1, 0
            if self.logger is not None:
                self.logger.log(metrics, step=self.global_step)
            self._stopping = self._any_rank(self.stop.requested)  # e.g. during the rollout
            if self._stopping or self._due(self.tcfg.checkpoint_every, epoch, last):
                self._save_checkpoints(metrics)
            if self._stopping:
                raise self._interrupted(epoch)
            if last:
                break
        self.clock.stop()
        if self.logger is not None:
            self.logger.finish()
        return metrics

    @staticmethod
    def _due(every: int | None, epoch: int, last: bool) -> bool:
        return bool(every) and ((epoch + 1) % every == 0 or last)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        value = torch.tensor([float(flag)], device=self.device)
        return bool(mean_across_ranks(value, self.dist).item() > 0)

    def _interrupted(self, epoch: int) -> TrainingInterrupted:
        signum = self.stop.signum or signal.SIGTERM  # another rank got the signal
        latest = self.ckpt_dir / LATEST
        return TrainingInterrupted(
            f"interrupted at epoch {epoch + 1} step {self.global_step}; {latest} saved",
            f"resume=true hydra.run.dir={self.run_dir}",
            signum,
        )

    def _train_epoch(self, epoch: int) -> float:
        """Trains one epoch (the rest of it after a mid-epoch resume); returns its mean loss."""
        self.model.train()
        self.train_sampler.set_epoch(epoch)  # this epoch's shuffle, the same on every rank
        self.train_sampler.skip_batches = self.epoch_step
        remaining = self.steps_per_epoch - self.epoch_step
        bar = tqdm(
            batches(self.train_loader, self.device, remaining),
            total=remaining,
            desc=f"epoch {epoch + 1}/{self.tcfg.num_epochs}",
            leave=False,
            mininterval=1.0,
            disable=not self.dist.is_main,
        )
        losses = []
        self.skipped.in_epoch = 0
        for batch in bar:
            loss_value, grad_norm_value = self._forward_backward(batch)
            if math.isfinite(loss_value) and math.isfinite(grad_norm_value):
                self._optimizer_step(loss_value)
                losses.append(loss_value)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            else:
                # Nothing changes (so every checkpoint holds finite weights); too many in a
                # row stop the run.
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped.skip(loss_value, grad_norm_value, self.global_step)
            self.epoch_step += 1
            if self.out_of_time or self._stopping:
                break
        return float(np.mean(losses)) if losses else float("nan")

    def _forward_backward(self, batch: Any) -> tuple[float, float]:
        """The loss and gradient of one batch; returns (loss, gradient norm) over all ranks."""
        with autocast(self.device, self.tcfg.precision):
            loss = self.model(batch)  # the policy's compute_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # across ranks, DDP averages the gradients here
        # The total gradient norm (clipped to grad_clip_norm when set) is NaN/inf if any
        # gradient is; read it with the loss in one device sync. Averaged over ranks, the
        # loss is the global batch's, and NaN/inf on any rank makes every rank skip the step
        # (ranks that disagreed would wait for each other forever).
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.policy.parameters(), self.tcfg.grad_clip_norm or math.inf
        )
        # The time budget and stop signals are read here too, so all ranks stop after the
        # same step.
        flags = [float(self.clock.exhausted), float(self.stop.requested)]
        loss_value, grad_norm_value, out_of_time, stop = mean_across_ranks(
            torch.stack(
                [
                    loss.detach().float(),
                    grad_norm.float().to(loss.device),
                    *torch.tensor(flags, device=loss.device),
                ]
            ),
            self.dist,
        ).tolist()
        self.out_of_time, self._stopping = out_of_time > 0, stop > 0
        return loss_value, grad_norm_value

    def _optimizer_step(self, loss_value: float) -> None:
        self.skipped.good_step()
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.policy)
        self.global_step += 1
        if self.logger is not None and self.global_step % self.tcfg.log_every == 0:
            lr = self.lr_scheduler.get_last_lr()[0]
            self.logger.log({"train/loss": loss_value, "lr": lr}, step=self.global_step)

    @property
    def eval_policy(self) -> torch.nn.Module:
        """The EMA weights when EMA is on: those are evaluated and rolled out."""
        return self.ema.model if self.ema is not None else self.policy

    @torch.no_grad()
    def _validate(self) -> float:
        policy = self.eval_policy.eval()
        loader = self._loader(self.val_dataset)
        with autocast(self.device, self.tcfg.precision):
            losses = [
                policy.compute_loss(batch).item()
                for batch in batches(loader, self.device, self.tcfg.max_val_steps)
            ]
        return float(np.mean(losses)) if losses else float("nan")

    def _rollout(self, epoch: int) -> dict[str, float]:
        """Rolls out the evaluated policy; a failing rollout costs its metrics, never the run."""
        try:
            with self.stop.immediate():  # a rollout can take minutes: a signal ends it at once
                result = self.env_runner.run(self.eval_policy.eval())
        except KeyboardInterrupt:
            self.stop.request(self.stop.signum or signal.SIGINT)
            log.warning("rollout of epoch %d interrupted: saving and stopping", epoch + 1)
            return {}
        except BaseException as e:  # noqa: BLE001 -- even SystemExit: training goes on
            log.error(
                "rollout of epoch %d failed (%s: %s); training goes on without its metrics",
                epoch + 1,
                type(e).__name__,
                e,
            )
            return {}
        for i, video in enumerate(result.get("videos", [])):
            self.logger.log_video(f"rollout/video_{i}", video, step=self.global_step)
        metrics = {k: v for k, v in result.items() if isinstance(v, int | float)}
        if "test/mean_score" in metrics:
            score, best = metrics["test/mean_score"], self.best_score
            self.best_score = score if best is None else max(score, best)
            metrics["test/best_mean_score"] = self.best_score
        return metrics

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, metrics: dict[str, float], rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.policy.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "clock": self.clock.state_dict(),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "shape_meta": self.shape_meta,
            "rng_states": rng_states,  # one per rank
        }

    def _save_checkpoints(self, metrics: dict[str, float]) -> None:
        """Rank 0 writes ``latest.ckpt`` (and a top-k one) with every rank's random state."""
        rng_states = gather_objects(rng_state(self.device), self.dist)
        if self.dist.is_main:
            self._write_checkpoints(self._state(metrics, rng_states), metrics)
        # No rank goes on before the checkpoint is on disk.
        barrier(self.dist)

    def _write_checkpoints(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        latest = self.ckpt_dir / LATEST
        check_finite_weights(state, latest, self.run_dir, self.epoch, self.global_step)
        try:
            save_checkpoint(latest, state)
            if "test/mean_score" in metrics:
                self.topk.save(self.epoch - 1, metrics["test/mean_score"], state)
        except CheckpointWriteError as e:
            resume = (
                f"continue from {latest} with resume=true hydra.run.dir={self.run_dir}"
                if latest.exists()
                else "no checkpoint of this run was saved"
            )
            raise CheckpointWriteError(
                f"{e}. Training stopped at epoch {self.epoch}, step {self.global_step}; "
                f"after fixing this, {resume}"
            ) from e
        self.logger.sync()  # The logs are on disk at least up to this checkpoint.
