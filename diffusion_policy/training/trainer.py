"""The one trainer: optimization, EMA, validation, rollouts, checkpoints and logging."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from diffusion_policy.data.download import ensure_dataset
from diffusion_policy.training.builders import build_policy, resolve_device
from diffusion_policy.training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    TopKCheckpoints,
    check_writable,
    load_checkpoint,
    load_model_state,
    remove_stale_temp_files,
    save_checkpoint,
    warn_if_low_disk,
)
from diffusion_policy.training.config_checks import check_config
from diffusion_policy.training.distributed import (
    barrier,
    gather_objects,
    init_distributed,
    main_rank_first,
    mean_across_ranks,
)
from diffusion_policy.training.ema import EMA
from diffusion_policy.training.logger import RunLogger
from diffusion_policy.training.optim import build_optimizer
from diffusion_policy.training.precision import autocast
from diffusion_policy.training.time_budget import TimeBudget, budget_lr_schedule

log = logging.getLogger(__name__)

LATEST = "latest.ckpt"


class NonFiniteLossError(FloatingPointError):
    """Too many training steps in a row had a NaN or infinite loss or gradient."""


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for one rank's training noise, independent of other ranks' and other seeds'."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """torch's random state (training draws from torch only: noise, timesteps, crops, dropout)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Mapping[str, torch.Tensor | None], device: torch.device) -> None:
    """Restores a state saved by :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _collate_batch(batch: Any) -> Any:
    """The dataset's ``__getitems__`` already returns a batch; nothing to collate."""
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves a nested dict of tensors to ``device``."""
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


class Trainer:
    """Trains a :class:`DiffusionPolicy` as the config says, in the run folder ``run_dir``.

    Launched by ``torchrun``, it trains data-parallel: each rank trains on its own shard of
    every epoch with ``trainer.batch_size / world_size`` samples per step (the config's batch
    size is the global one), DDP averages the gradients, and rank 0 alone validates, rolls out,
    logs and writes checkpoints. Every rank resumes from the same ``latest.ckpt``.

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
        check_config(cfg)
        # Under torchrun: this process's rank, and its GPU (cuda:LOCAL_RANK).
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        world_size = self.dist.world_size
        if self.tcfg.batch_size % world_size:
            raise ValueError(
                f"trainer.batch_size={self.tcfg.batch_size} (the global batch) must be divisible "
                f"by the number of processes, WORLD_SIZE={world_size}"
            )
        self.batch_size = self.tcfg.batch_size // world_size  # per rank
        if self.dist.is_main:
            # Fail before hours of training, not at the first checkpoint.
            check_writable(self.ckpt_dir)
            remove_stale_temp_files(self.ckpt_dir)
        # The same seed on every rank: the same split and initial weights.
        seed_everything(cfg.seed)

        # Data: train/val split by whole episodes; the normalizer is fit on the train split.
        with main_rank_first(self.dist):  # rank 0 downloads the data if needed, once
            zarr_path = ensure_dataset(cfg.dataset.zarr_path)
        self.dataset = instantiate(cfg.dataset, zarr_path=str(zarr_path))
        self.val_dataset = self.dataset.get_validation_dataset()
        self.shape_meta = OmegaConf.to_container(OmegaConf.create(self.dataset.shape_meta))

        self.policy = build_policy(cfg, self.shape_meta)
        self.policy.normalizer.fit(self.dataset.get_normalizer_data())
        self.policy.to(self.device)
        self.ema = EMA(self.policy, **cfg.ema.params) if cfg.ema.enabled else None
        if self.tcfg.compile:
            # The denoiser runs at every step and denoising iteration; compiling it fuses its
            # elementwise work (GroupNorm, Mish, FiLM). Parameter names stay the same. Static
            # shapes: one quick compile per batch size, not a slow dynamic-shape one.
            self.policy.denoiser.compile(dynamic=False)
            if self.ema is not None:
                self.ema.model.denoiser.compile(dynamic=False)
        # A checkpoint holds about 4 copies of the weights (model, EMA, Adam's two moments).
        ckpt_bytes = 4 * sum(p.numel() * p.element_size() for p in self.policy.parameters())
        if self.dist.is_main:
            warn_if_low_disk(self.ckpt_dir, (self.tcfg.topk + 2) * ckpt_bytes)

        self.optimizer = build_optimizer(cfg.optimizer, self.policy)
        # Training calls `self.model`: the policy, or across ranks the policy in DDP, whose
        # backward averages the gradients. Evaluation and checkpoints use `self.policy`.
        self.model: torch.nn.Module = self.policy
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.policy, device_ids=device_ids)
        # Each rank draws its own diffusion noise and timesteps.
        torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))

        # Rank r takes every world_size-th window of an epoch's shuffle, so one step of all
        # ranks sees the batch a single process would. The shuffle depends on (seed, epoch)
        # only (`set_epoch`), so a resumed run sees the same batches as an uninterrupted one.
        self.train_sampler = DistributedSampler(
            self.dataset,
            num_replicas=world_size,
            rank=self.dist.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        self.train_loader = self._loader(self.dataset, self.train_sampler)
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise ValueError(
                f"trainer.batch_size={self.tcfg.batch_size} is larger than the "
                f"{len(self.dataset)} training windows: not one full batch per epoch"
            )
        if self.tcfg.max_train_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, self.tcfg.max_train_steps_per_epoch)
        # With trainer.max_minutes the run ends on time and the learning rate follows the
        # schedule over the fraction of the budget spent; otherwise over num_epochs.
        self.clock = TimeBudget(self.tcfg.get("max_minutes"))
        if self.clock.limited:
            self.lr_scheduler = budget_lr_schedule(
                self.optimizer,
                self.clock,
                name=cfg.lr_scheduler.name,
                num_warmup_steps=cfg.lr_scheduler.num_warmup_steps,
            )
        else:
            self.lr_scheduler = instantiate(cfg.lr_scheduler)(
                optimizer=self.optimizer,
                num_training_steps=steps_per_epoch * self.tcfg.num_epochs,
            )
        self.env_runner = (
            instantiate(cfg.env_runner, output_dir=str(self.run_dir / "media"))
            if self.tcfg.rollout_every and self.dist.is_main
            else None
        )
        self.topk = TopKCheckpoints(self.ckpt_dir, k=self.tcfg.topk)

        self.epoch = 0
        self.global_step = 0
        self.best_score: float | None = None  # the run's best test/mean_score so far
        self._nonfinite_in_a_row = 0  # consecutive skipped steps, across epochs
        self._skipped_steps = 0  # in the current epoch
        self.out_of_time = False  # the time budget ran out (the same on every rank)
        resumed = cfg.resume and self._try_resume()
        if cfg.resume and self.dist.enabled:
            steps = gather_objects(self.global_step, self.dist)
            if len(set(steps)) > 1:
                raise CheckpointError(
                    f"the ranks resumed at different steps {steps}: every node must see the "
                    f"same run folder {self.run_dir} (a shared file system)"
                )
        self.logger = (
            RunLogger(
                self.run_dir,
                config=OmegaConf.to_container(cfg, resolve=True),
                resume=resumed,
                resume_step=self.global_step if resumed else None,
                **cfg.logger,
            )
            if self.dist.is_main
            else None
        )
        n_params = sum(p.numel() for p in self.policy.parameters())
        log.info(
            "policy: %.2fM parameters; %d train / %d val windows; device %s; rank %d of %d",
            n_params / 1e6,
            len(self.dataset),
            len(self.val_dataset),
            self.device,
            self.dist.rank,
            world_size,
        )

    # -- data ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, sampler: DistributedSampler | None = None) -> DataLoader:
        """Batches of ``self.batch_size`` (per rank); in order without a sampler."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=self.tcfg.num_workers,
            persistent_workers=self.tcfg.num_workers > 0,
            pin_memory=self.device.type == "cuda",
            collate_fn=_collate_batch,
        )

    def _batches(self, loader: DataLoader, max_steps: int | None) -> Iterator[Any]:
        for i, batch in enumerate(loader):
            if max_steps and i >= max_steps:
                return
            yield to_device(batch, self.device)

    # -- loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Runs the remaining epochs; returns the last epoch's metrics.

        Only rank 0 has evaluation metrics; :attr:`best_score` holds the run's best test score.
        """
        metrics: dict[str, float] = {}
        self.clock.start()
        for epoch in range(self.epoch, self.tcfg.num_epochs):
            metrics = {"epoch": epoch, "train/loss_epoch": self._train_epoch(epoch)}
            metrics["train/skipped_steps"] = self._skipped_steps
            # The last epoch: by count, or cut short when the time budget ran out.
            last = epoch == self.tcfg.num_epochs - 1 or self.out_of_time

            # Rank 0 alone evaluates; the other ranks wait for it in their next all-reduce.
            if self.dist.is_main and self._due(self.tcfg.val_every, epoch, last):
                metrics["val/loss"] = self._validate()
            metrics["train/minutes"] = self.clock.spent / 60  # training time, rollouts excluded
            if self.env_runner is not None and self._due(self.tcfg.rollout_every, epoch, last):
                with self.clock.paused():
                    metrics.update(self._rollout())

            self.epoch = epoch + 1
            if self.logger is not None:
                self.logger.log(metrics, step=self.global_step)
            if self._due(self.tcfg.checkpoint_every, epoch, last):
                self._save_checkpoints(metrics)
            if last:
                break
        self.clock.stop()
        if self.logger is not None:
            self.logger.finish()
        return metrics

    @staticmethod
    def _due(every: int | None, epoch: int, last: bool) -> bool:
        return bool(every) and ((epoch + 1) % every == 0 or last)

    def _train_epoch(self, epoch: int) -> float:
        """Trains one epoch; returns its mean loss (over ranks and steps)."""
        self.model.train()
        self.train_sampler.set_epoch(epoch)  # this epoch's shuffle, the same on every rank
        max_steps = self.tcfg.max_train_steps_per_epoch
        total = min(len(self.train_loader), max_steps or len(self.train_loader))
        bar = tqdm(
            self._batches(self.train_loader, max_steps),
            total=total,
            desc=f"epoch {epoch + 1}/{self.tcfg.num_epochs}",
            leave=False,
            mininterval=1.0,
            disable=not self.dist.is_main,
        )
        losses = []
        self._skipped_steps = 0
        for batch in bar:
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
            # The time budget is read here too, so all ranks stop after the same step.
            out_of_time = float(self.clock.exhausted)
            loss_value, grad_norm_value, out_of_time = mean_across_ranks(
                torch.stack(
                    [
                        loss.detach().float(),
                        grad_norm.float().to(loss.device),
                        torch.tensor(out_of_time, device=loss.device),
                    ]
                ),
                self.dist,
            ).tolist()
            self.out_of_time = out_of_time > 0
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                self._skip_nonfinite_step(loss_value, grad_norm_value)
                continue
            self._nonfinite_in_a_row = 0
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.policy)

            self.global_step += 1
            losses.append(loss_value)
            if self.logger is not None and self.global_step % self.tcfg.log_every == 0:
                lr = self.lr_scheduler.get_last_lr()[0]
                self.logger.log({"train/loss": loss_value, "lr": lr}, step=self.global_step)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if self.out_of_time:
                break
        return float(np.mean(losses)) if losses else float("nan")

    def _skip_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """Drops a step with a NaN/inf loss or gradient; stops after too many in a row.

        A skipped step changes nothing: no optimizer, learning-rate or EMA update, and
        ``global_step`` stays. So every saved checkpoint holds finite weights.

        Raises:
            NonFiniteLossError: ``trainer.max_nonfinite_steps`` steps in a row were skipped.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite_in_a_row += 1
        self._skipped_steps += 1
        limit = self.tcfg.max_nonfinite_steps
        if self._nonfinite_in_a_row >= limit:
            latest = self.ckpt_dir / LATEST
            saved = (
                f"The last good checkpoint {latest} is intact: fix the cause, then continue "
                f"with resume=true hydra.run.dir={self.run_dir}"
                if latest.exists()
                else "No checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"{limit} training steps in a row had a non-finite loss or gradient (last: "
                f"loss={loss}, gradient norm={grad_norm}) after step {self.global_step}; "
                f"training stopped (trainer.max_nonfinite_steps={limit}). Try a lower "
                f"optimizer.lr or trainer.grad_clip_norm, and check the data. {saved}."
            )
        log.warning(
            "skipped a training step after step %d: loss=%s, gradient norm=%s "
            "(%d in a row; training stops at %d)",
            self.global_step,
            loss,
            grad_norm,
            self._nonfinite_in_a_row,
            limit,
        )

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
                for batch in self._batches(loader, self.tcfg.max_val_steps)
            ]
        return float(np.mean(losses)) if losses else float("nan")

    def _rollout(self) -> dict[str, float]:
        result = self.env_runner.run(self.eval_policy.eval())
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

    def _try_resume(self) -> bool:
        path = self.ckpt_dir / LATEST
        if not path.exists():
            log.warning("resume=true but %s does not exist: starting a new run", path)
            return False
        state = load_checkpoint(path)
        load_model_state(self.policy, state["model"], what=f"checkpoint {path}")
        if self.ema is not None:
            if not state.get("ema"):
                raise CheckpointError(f"checkpoint {path} has no EMA weights but ema.enabled=true")
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_score = state.get("best_score")
        if state.get("clock"):
            self.clock.load_state_dict(state["clock"])
        # Each rank continues its own random stream: the steps after the resume draw the same
        # noise as in an uninterrupted run.
        rng_states = state.get("rng_states") or []
        if len(rng_states) == self.dist.world_size:
            set_rng_state(rng_states[self.dist.rank], self.device)
        else:
            log.warning(
                "%s was saved by %d processes, this run has %d: the random streams restart, so "
                "the run goes on, but not exactly as an uninterrupted one would",
                path,
                len(rng_states),
                self.dist.world_size,
            )
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)
        return True
