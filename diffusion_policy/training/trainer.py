"""The one trainer: optimization, EMA, validation, rollouts, checkpoints and logging."""

from __future__ import annotations

import itertools
import logging
import math
import random
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
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
from diffusion_policy.training.config_checks import ConfigError, check_config, check_device
from diffusion_policy.training.distributed import (
    DistInfo,
    barrier,
    gather_objects,
    init_distributed,
    main_rank_first,
    mean_across_ranks,
)
from diffusion_policy.training.ema import EMA
from diffusion_policy.training.interrupt import StopSignals, TrainingInterrupted
from diffusion_policy.training.logger import RunLogger
from diffusion_policy.training.optim import build_optimizer
from diffusion_policy.training.precision import autocast
from diffusion_policy.training.run_dir import (
    LATEST,
    RunFolderLock,
    check_resume_config,
    find_resume_checkpoint,
    record_config,
)
from diffusion_policy.training.time_budget import TimeBudget, budget_lr_schedule

log = logging.getLogger(__name__)

# The entries of a checkpoint that a resume reads.
RESUME_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "global_step")


class NonFiniteLossError(FloatingPointError):
    """Too many training steps in a row had a NaN or infinite loss or gradient."""


class NonFiniteWeightsError(FloatingPointError):
    """The weights to checkpoint hold NaN or inf values; the checkpoint was not written."""


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


def nonfinite_tensors(state: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The names of the floating-point tensors in a nested state dict that hold NaN or inf."""
    bad = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            bad += nonfinite_tensors(value, prefix=f"{name}.")
        elif (
            torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
        ):
            bad.append(name)
    return bad


# -- building a run: one function per part, each usable alone -------------------------------------
def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """The batch of one rank: ``trainer.batch_size`` is the global batch.

    Raises:
        ConfigError: The global batch does not split evenly over the ranks.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"trainer.batch_size={batch_size} (the global batch) must be divisible "
            f"by the number of processes, WORLD_SIZE={world_size}"
        )
    return batch_size // world_size


def build_data(cfg: DictConfig, dist: DistInfo) -> tuple[Any, Any, dict[str, Any]]:
    """The train and validation datasets (split by whole episodes) and their shape description.

    Rank 0 downloads the data first when it is missing; the other ranks then read it.
    """
    with main_rank_first(dist):
        zarr_path = ensure_dataset(cfg.dataset.zarr_path)
    dataset = instantiate(cfg.dataset, zarr_path=str(zarr_path))
    shape_meta = OmegaConf.to_container(OmegaConf.create(dataset.shape_meta))
    return dataset, dataset.get_validation_dataset(), shape_meta


def build_policy_and_ema(
    cfg: DictConfig, shape_meta: Mapping[str, Any], normalizer_data: Any, device: torch.device
) -> tuple[torch.nn.Module, EMA | None]:
    """The policy, its normalizer fit on the training data, and its EMA copy if enabled."""
    policy = build_policy(cfg, shape_meta)
    policy.normalizer.fit(normalizer_data)
    policy.to(device)
    ema = EMA(policy, **cfg.ema.params) if cfg.ema.enabled else None
    if cfg.trainer.compile:
        # The denoiser runs at every step and denoising iteration; compiling it fuses its
        # elementwise work (GroupNorm, Mish, FiLM). Parameter names stay the same. Static
        # shapes: one quick compile per batch size, not a slow dynamic-shape one.
        policy.denoiser.compile(dynamic=False)
        if ema is not None:
            ema.model.denoiser.compile(dynamic=False)
    return policy, ema


class ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler` whose next epoch can start some batches in.

    A run interrupted mid-epoch resumes with the rest of that epoch's batches: the shuffle
    depends on (seed, epoch) only, so skipping the first ``skip_batches`` of it continues
    exactly where the run stopped, without loading the skipped data.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.skip_batches = 0  # for the next epoch only

    def set_epoch(self, epoch: int) -> None:
        """This epoch's shuffle, the same on every rank."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        return itertools.islice(iter(self.sampler), start, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip_batches * self.batch_size


def make_loader(
    dataset: Any,
    batch_size: int,
    tcfg: DictConfig,
    device: torch.device,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    """Batches of ``batch_size``; in order (and the last one short) without a sampler."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=sampler is not None,
        num_workers=tcfg.num_workers,
        persistent_workers=tcfg.num_workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=_collate_batch,
    )


def count_steps_per_epoch(loader: DataLoader, tcfg: DictConfig) -> int:
    """Optimizer steps per epoch: full batches, capped by ``max_train_steps_per_epoch``.

    Raises:
        ConfigError: Not one full batch fits in the training windows.
    """
    steps = len(loader)
    if steps == 0:
        raise ConfigError(
            f"trainer.batch_size={tcfg.batch_size} is larger than the "
            f"{len(loader.dataset)} training windows: not one full batch per epoch"
        )
    return min(steps, tcfg.max_train_steps_per_epoch or steps)


def build_lr_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, clock: TimeBudget, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over the run: its epochs, or its time budget when it has one."""
    if clock.limited:
        return budget_lr_schedule(
            optimizer,
            clock,
            name=cfg.lr_scheduler.name,
            num_warmup_steps=cfg.lr_scheduler.num_warmup_steps,
        )
    return instantiate(cfg.lr_scheduler)(
        optimizer=optimizer, num_training_steps=steps_per_epoch * cfg.trainer.num_epochs
    )


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    settings: list[dict[str, Any]],
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Puts the config's optimizer settings back after loading a checkpoint's optimizer state.

    ``load_state_dict`` restores the saved hyperparameters; a resumed run that changed
    ``optimizer.lr`` or ``weight_decay`` trains with the new ones. The learning rate keeps its
    place in the schedule: the current rate is scaled by new base rate / old base rate.

    Args:
        optimizer: The optimizer, after ``load_state_dict``.
        settings: Each param group's settings as the config built them (without ``params``).
        lr_scheduler: The schedule, after ``load_state_dict``.
    """
    for i, (group, fresh) in enumerate(zip(optimizer.param_groups, settings, strict=True)):
        for key, value in fresh.items():
            if key not in ("lr", "initial_lr"):
                group[key] = value
        old_base, new_base = lr_scheduler.base_lrs[i], fresh.get("initial_lr", fresh["lr"])
        if old_base != new_base and old_base > 0:
            group["lr"] *= new_base / old_base
            group["initial_lr"] = lr_scheduler.base_lrs[i] = new_base
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


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
        resume_state = self._open_run_folder()
        # The same seed on every rank: the same split and initial weights.
        seed_everything(cfg.seed)
        self.dataset, self.val_dataset, self.shape_meta = build_data(cfg, self.dist)
        self.policy, self.ema = build_policy_and_ema(
            cfg, self.shape_meta, self.dataset.get_normalizer_data(), self.device
        )
        if self.dist.is_main:
            # A checkpoint holds about 4 copies of the weights (model, EMA, Adam's two moments).
            ckpt_bytes = 4 * sum(p.numel() * p.element_size() for p in self.policy.parameters())
            warn_if_low_disk(self.ckpt_dir, (tcfg.topk + 2) * ckpt_bytes)
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
        self.train_sampler = ResumableSampler(
            DistributedSampler(
                self.dataset,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=True,
                seed=cfg.seed,
                drop_last=True,
            ),
            self.batch_size,
        )
        self.train_loader = self._loader(self.dataset, self.train_sampler)
        self.steps_per_epoch = count_steps_per_epoch(self.train_loader, tcfg)
        # With trainer.max_minutes the run ends on time and the learning rate follows the
        # schedule over the fraction of the budget spent; otherwise over num_epochs.
        self.clock = TimeBudget(tcfg.get("max_minutes"))
        self.lr_scheduler = build_lr_scheduler(
            cfg, self.optimizer, self.clock, self.steps_per_epoch
        )
        self.env_runner = (
            instantiate(cfg.env_runner, output_dir=str(self.run_dir / "media"))
            if tcfg.rollout_every and self.dist.is_main
            else None
        )
        self.topk = TopKCheckpoints(self.ckpt_dir, k=tcfg.topk)

        self.epoch = 0  # epochs done
        self.epoch_step = 0  # batches done in the current epoch (a mid-epoch checkpoint)
        self.global_step = 0
        self.best_score: float | None = None  # the run's best test/mean_score so far
        self._nonfinite_in_a_row = 0  # consecutive skipped steps, across epochs
        self._skipped_steps = 0  # in the current epoch
        self.out_of_time = False  # the time budget ran out (the same on every rank)
        self._stopping = False  # a stop signal reached some rank (the same on every rank)
        if resume_state is not None:
            self._load_state(*resume_state)
        self._check_ranks_agree()
        if self.dist.is_main:
            self.logger = RunLogger(
                self.run_dir,
                config=OmegaConf.to_container(cfg, resolve=True),
                resume=resume_state is not None,
                resume_step=self.global_step if resume_state is not None else None,
                **cfg.logger,
            )
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

    # -- the run folder -----------------------------------------------------------------------
    def _open_run_folder(self) -> tuple[Path, dict[str, Any]] | None:
        """Locks the folder, checks that it fits ``resume``, and records the config.

        Returns:
            The checkpoint to resume from and its state, or None for a new run.

        Raises:
            RunFolderError: The folder is in use, holds another run, has nothing to resume,
                or the resume changes a setting the checkpoint's weights depend on.
            CheckpointError: The checkpoint to resume from is corrupt or lacks an entry.
        """
        if self.dist.is_main:
            self.lock.acquire()
            # Fail before hours of training, not at the first checkpoint.
            check_writable(self.ckpt_dir)
            remove_stale_temp_files(self.ckpt_dir)
        path = find_resume_checkpoint(self.run_dir, bool(self.cfg.resume))
        config = OmegaConf.to_container(self.cfg, resolve=True)
        state, changes = None, {}
        if path is not None:
            state = load_checkpoint(path)
            missing = [key for key in RESUME_KEYS if key not in state]
            if missing:
                raise CheckpointError(
                    f"checkpoint {path} has no {', '.join(map(repr, missing))} entry: it cannot "
                    "be resumed from (was it written by this trainer?)"
                )
            changes = check_resume_config(state.get("config"), config, path)
        if self.dist.is_main:
            # Only now that the resume is accepted: config.yaml tells what this run trains with.
            step = int(state["global_step"]) if state is not None else None
            record_config(self.run_dir, config, changes, step=step)
        return (path, state) if state is not None else None

    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        """Continues the run of checkpoint ``state``, read from ``path``."""
        load_model_state(self.policy, state["model"], what=f"checkpoint {path}")
        if self.ema is not None:
            if not state.get("ema"):
                raise CheckpointError(f"checkpoint {path} has no EMA weights but ema.enabled=true")
            self.ema.load_state_dict(state["ema"])
        groups = self.optimizer.param_groups
        settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        apply_optimizer_settings(self.optimizer, settings, self.lr_scheduler)
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state.get("epoch_step", 0))
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

    def _check_ranks_agree(self) -> None:
        if self.cfg.resume and self.dist.enabled:
            steps = gather_objects(self.global_step, self.dist)
            if len(set(steps)) > 1:
                raise CheckpointError(
                    f"the ranks resumed at different steps {steps}: every node must see the "
                    f"same run folder {self.run_dir} (a shared file system)"
                )

    # -- data ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, sampler: Sampler[int] | None = None) -> DataLoader:
        """Batches of ``self.batch_size`` (per rank); in order without a sampler."""
        return make_loader(dataset, self.batch_size, self.tcfg, self.device, sampler)

    def _batches(self, loader: DataLoader, max_steps: int | None) -> Iterator[Any]:
        for i, batch in enumerate(loader):
            if max_steps is not None and i >= max_steps:
                return
            yield to_device(batch, self.device)

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
            metrics["train/skipped_steps"] = self._skipped_steps
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
            self._batches(self.train_loader, remaining),
            total=remaining,
            desc=f"epoch {epoch + 1}/{self.tcfg.num_epochs}",
            leave=False,
            mininterval=1.0,
            disable=not self.dist.is_main,
        )
        losses = []
        self._skipped_steps = 0
        for batch in bar:
            loss_value, grad_norm_value = self._forward_backward(batch)
            if math.isfinite(loss_value) and math.isfinite(grad_norm_value):
                self._optimizer_step(loss_value)
                losses.append(loss_value)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            else:
                self._skip_nonfinite_step(loss_value, grad_norm_value)
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
        self._nonfinite_in_a_row = 0
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.policy)
        self.global_step += 1
        if self.logger is not None and self.global_step % self.tcfg.log_every == 0:
            lr = self.lr_scheduler.get_last_lr()[0]
            self.logger.log({"train/loss": loss_value, "lr": lr}, step=self.global_step)

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
        self._check_finite(state)
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

    def _check_finite(self, state: dict[str, Any]) -> None:
        """Refuses to checkpoint NaN/inf weights: the previous checkpoint stays the good one.

        Raises:
            NonFiniteWeightsError: Naming the first bad tensors and the checkpoint to go back to.
        """
        bad = nonfinite_tensors({"model": state["model"], "ema": state["ema"] or {}})
        if not bad:
            return
        latest = self.ckpt_dir / LATEST
        previous = (
            f"{latest} (epoch {load_checkpoint(latest)['epoch']}) is the last good checkpoint, "
            f"untouched: fix the cause (a lower optimizer.lr, trainer.grad_clip_norm), then "
            f"continue with resume=true hydra.run.dir={self.run_dir}"
            if latest.exists()
            else "No checkpoint of this run was saved"
        )
        raise NonFiniteWeightsError(
            f"the weights hold NaN or inf values at epoch {self.epoch}, step {self.global_step} "
            f"({len(bad)} tensors, e.g. {', '.join(bad[:3])}); training stopped without writing "
            f"them. {previous}."
        )
