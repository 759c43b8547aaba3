"""Measures the image policy: training step time and data-loader throughput.

    python scripts/measure_image.py          # both, at the paper config (+experiment=pusht)
    python scripts/measure_image.py --what loader --workers 0 2
    python scripts/measure_image.py --what step --steps 5 denoiser.down_dims=[64,128,256]

Trailing ``key=value`` arguments are Hydra overrides of ``train.yaml`` + ``+experiment=pusht``.
A step is what the trainer does per batch: loss, backward, optimizer, LR scheduler and EMA
update, on real batches (random 84x84 crops). The loader figure is samples/s of a shuffled
``DataLoader`` over the training windows (uint8 frames, batches by ``__getitems__``). Peak RSS
of a whole training process is best read with ``/usr/bin/time -v python train.py ...``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_policy.training.builders import build_policy  # noqa: E402
from diffusion_policy.training.ema import EMA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _pass_through(batch: dict) -> dict:
    return batch  # __getitems__ already made the batch


def measure_loader(dataset, batch_size: int, workers: int, n_batches: int) -> float:
    """Samples/s of a shuffled DataLoader with ``workers`` processes."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
        drop_last=True,
        num_workers=workers,
        collate_fn=_pass_through,
    )
    n_batches = min(n_batches, len(loader) - 1)  # one epoch at most
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    tic = time.perf_counter()
    for _ in range(n_batches):
        batch = next(it)
        batch["obs"]["image"].float()  # the conversion the encoder does, for a fair figure
    return n_batches * batch_size / (time.perf_counter() - tic)


def measure_step(cfg, dataset, n_steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``n_steps`` training steps after ``warmup`` steps."""
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg, dataset.shape_meta)
    policy.normalizer.fit(dataset.get_normalizer_data())
    n_params = sum(p.numel() for p in policy.parameters())
    n_enc = sum(p.numel() for p in policy.encoder.parameters())
    print(f"policy: {n_params / 1e6:.1f}M parameters ({n_enc / 1e6:.2f}M in the encoder)")
    ema = EMA(policy, **cfg.ema.params) if cfg.ema.enabled else None
    optimizer = instantiate(cfg.optimizer)(params=policy.parameters())
    lr_scheduler = instantiate(cfg.lr_scheduler)(optimizer=optimizer, num_training_steps=10**6)
    policy.train()
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + n_steps):
        idx = torch.randint(0, len(dataset), (cfg.trainer.batch_size,), generator=gen)
        batch = dataset.get_batch(idx.numpy())
        tic = time.perf_counter()
        loss = policy.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        if ema is not None:
            ema.update(policy)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
            print(f"  step {i - warmup + 1}: {times[-1]:.2f} s, loss {loss.item():.4f}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=["step", "loader", "all"], default="all")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader workers")
    parser.add_argument("--loader-batches", type=int, default=150, help="timed batches")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.batch_size=32")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=pusht", *args.overrides])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tic = time.perf_counter()
    dataset = instantiate(cfg.dataset)
    images = dataset.arrays["image"]
    print(
        f"dataset: {len(dataset)} windows; images {images.shape} {images.dtype}, "
        f"{images.nbytes / 1e9:.3f} GB; loaded in {time.perf_counter() - tic:.1f} s; "
        f"peak RSS so far {_peak_rss_gib():.2f} GiB"
    )
    batch_size = cfg.trainer.batch_size
    if args.what in ("loader", "all"):
        for workers in args.workers:
            rate = measure_loader(dataset, batch_size, workers, args.loader_batches)
            print(f"loader: batch {batch_size}, {workers} workers: {rate:,.0f} samples/s")
    if args.what in ("step", "all"):
        print(
            f"step: batch {batch_size}, down_dims {list(cfg.denoiser.down_dims)}, "
            f"encoder width {cfg.encoder.backbone.width}, crop {list(cfg.encoder.crop_size)}"
        )
        times = measure_step(cfg, dataset, args.steps, args.warmup)
        med = statistics.median(times)
        print(f"step: median {med:.2f} s ({batch_size / med:.1f} samples/s) over {len(times)}")
    print(f"peak RSS: {_peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
