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
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from diffusion_policy.data.download import ensure_dataset
from diffusion_policy.training.builders import build_policy, resolve_device
from diffusion_policy.training.checkpoint import (
    CheckpointError,
    TopKCheckpoints,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from diffusion_policy.training.ema import EMA
from diffusion_policy.training.logger import RunLogger

log = logging.getLogger(__name__)

LATEST = "latest.ckpt"


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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

    Args:
        cfg: The composed run config (see ``configs/train.yaml``).
        run_dir: Folder for checkpoints, logs, media and the resolved config.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)

        # Data: train/val split by whole episodes; the normalizer is fit on the train split.
        zarr_path = ensure_dataset(cfg.dataset.zarr_path)
        self.dataset = instantiate(cfg.dataset, zarr_path=str(zarr_path))
        self.val_dataset = self.dataset.get_validation_dataset()
        self.shape_meta = OmegaConf.to_container(OmegaConf.create(self.dataset.shape_meta))

        self.policy = build_policy(cfg, self.shape_meta)
        self.policy.normalizer.fit(self.dataset.get_normalizer_data())
        self.policy.to(self.device)
        self.ema = EMA(self.policy, **cfg.ema.params) if cfg.ema.enabled else None

        self.optimizer = instantiate(cfg.optimizer)(params=self.policy.parameters())
        # Reseeded every epoch, so a resumed run sees the same batches as an uninterrupted one.
        self.shuffle_generator = torch.Generator()
        self.train_loader = self._loader(self.dataset, shuffle=True)
        steps_per_epoch = len(self.train_loader)
        if self.tcfg.max_train_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, self.tcfg.max_train_steps_per_epoch)
        self.lr_scheduler = instantiate(cfg.lr_scheduler)(
            optimizer=self.optimizer,
            num_training_steps=steps_per_epoch * self.tcfg.num_epochs,
        )
        self.env_runner = (
            instantiate(cfg.env_runner, output_dir=str(self.run_dir / "media"))
            if self.tcfg.rollout_every
            else None
        )
        self.topk = TopKCheckpoints(self.ckpt_dir, k=self.tcfg.topk)

        self.epoch = 0
        self.global_step = 0
        resumed = cfg.resume and self._try_resume()
        self.logger = RunLogger(
            self.run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            resume=resumed,
            **cfg.logger,
        )
        n_params = sum(p.numel() for p in self.policy.parameters())
        log.info(
            "policy: %.2fM parameters; %d train / %d val windows; device %s",
            n_params / 1e6,
            len(self.dataset),
            len(self.val_dataset),
            self.device,
        )

    # -- data ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.tcfg.batch_size,
            sampler=RandomSampler(dataset, generator=self.shuffle_generator) if shuffle else None,
            drop_last=shuffle,
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
        """Runs the remaining epochs; returns the last epoch's metrics."""
        metrics: dict[str, float] = {}
        last_epoch = self.tcfg.num_epochs - 1
        for epoch in range(self.epoch, self.tcfg.num_epochs):
            metrics = {"epoch": epoch, "train/loss_epoch": self._train_epoch(epoch)}

            if self._due(self.tcfg.val_every, epoch, last_epoch):
                metrics["val/loss"] = self._validate()
            if self.env_runner is not None and self._due(self.tcfg.rollout_every, epoch, last_epoch):
                metrics.update(self._rollout())

            self.epoch = epoch + 1
            self.logger.log(metrics, step=self.global_step)
            if self._due(self.tcfg.checkpoint_every, epoch, last_epoch):
                self._save_checkpoints(metrics)
        self.logger.finish()
        return metrics

    @staticmethod
    def _due(every: int | None, epoch: int, last_epoch: int) -> bool:
        return bool(every) and ((epoch + 1) % every == 0 or epoch == last_epoch)

    def _train_epoch(self, epoch: int) -> float:
        self.policy.train()
        self.shuffle_generator.manual_seed(self.cfg.seed * 100_003 + epoch)
        max_steps = self.tcfg.max_train_steps_per_epoch
        total = min(len(self.train_loader), max_steps or len(self.train_loader))
        bar = tqdm(
            self._batches(self.train_loader, max_steps),
            total=total,
            desc=f"epoch {epoch + 1}/{self.tcfg.num_epochs}",
            leave=False,
            mininterval=1.0,
        )
        losses = []
        for batch in bar:
            loss = self.policy.compute_loss(batch)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"non-finite training loss {loss_value} at step {self.global_step}; "
                    f"the last good checkpoint is {self.ckpt_dir / LATEST}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.tcfg.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.tcfg.grad_clip_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.policy)

            self.global_step += 1
            losses.append(loss_value)
            if self.global_step % self.tcfg.log_every == 0:
                lr = self.lr_scheduler.get_last_lr()[0]
                self.logger.log({"train/loss": loss_value, "lr": lr}, step=self.global_step)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        return float(np.mean(losses)) if losses else float("nan")

    @property
    def eval_policy(self) -> torch.nn.Module:
        """The EMA weights when EMA is on: those are evaluated and rolled out."""
        return self.ema.model if self.ema is not None else self.policy

    @torch.no_grad()
    def _validate(self) -> float:
        policy = self.eval_policy.eval()
        loader = self._loader(self.val_dataset, shuffle=False)
        losses = [
            policy.compute_loss(batch).item()
            for batch in self._batches(loader, self.tcfg.max_val_steps)
        ]
        return float(np.mean(losses)) if losses else float("nan")

    def _rollout(self) -> dict[str, float]:
        result = self.env_runner.run(self.eval_policy.eval())
        for i, video in enumerate(result.get("videos", [])):
            self.logger.log_video(f"rollout/video_{i}", video, step=self.global_step)
        return {k: v for k, v in result.items() if isinstance(v, int | float)}

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "model": self.policy.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "shape_meta": self.shape_meta,
            "torch_rng_state": torch.get_rng_state(),
        }

    def _save_checkpoints(self, metrics: dict[str, float]) -> None:
        state = self._state(metrics)
        save_checkpoint(self.ckpt_dir / LATEST, state)
        if "test/mean_score" in metrics:
            self.topk.save(self.epoch - 1, metrics["test/mean_score"], state)

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
        torch.set_rng_state(state["torch_rng_state"])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)
        return True
