"""How much a BlockPush checkpoint's next move follows the pusher's own recent motion.

Usage: python scripts/probe_own_motion.py CHECKPOINT [--store PATH] [--n 400]
       [--scales 0 0.5 1 2] [--seed 0]

Samples the policy on ``--n`` demonstration windows whose older frames show the pusher's own
motion scaled (0: at rest, 1: as recorded, 2: twice as fast) and prints, per scale, the mean
predicted next move, the demonstrated one, their mean distance and cosine
(:mod:`diffusion_policy.envs.blockpush_probe`). The store defaults to the checkpoint's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion_policy.data.blockpush_dataset import BlockPushLowdimDataset
from diffusion_policy.envs.blockpush_probe import own_motion_probe, probe_windows
from diffusion_policy.training.builders import load_policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a BlockPush checkpoint")
    parser.add_argument("--store", type=Path, default=None, help="demonstration store (.zarr)")
    parser.add_argument("--n", type=int, default=400, help="windows to probe")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--seed", type=int, default=0, help="seed of windows and sampling")
    args = parser.parse_args(argv)
    if args.n < 1:
        print(f"error: --n={args.n} must be >= 1", file=sys.stderr)
        return 2
    policy, cfg = load_policy(args.checkpoint)
    store = args.store or Path(cfg.dataset.zarr_path)
    if not store.exists():
        print(f"error: no store at {store}; pass --store", file=sys.stderr)
        return 2
    dataset = BlockPushLowdimDataset(
        str(store),
        horizon=policy.horizon,
        n_obs_steps=policy.n_obs_steps,
        n_action_steps=1,
        abs_action=True,
        layout=cfg.dataset.get("layout", "paper"),
    )
    obs, targets = probe_windows(dataset, args.n, args.seed)
    results = own_motion_probe(
        policy, obs, targets, args.scales, bool(cfg.dataset.get("abs_action")), args.seed
    )
    print(f"{len(obs)} windows of {store}; lengths in cm")
    print("own-motion scale | predicted move | demonstrated | error | cosine")
    for scale, r in results.items():
        print(
            f"{scale:16.2f} | {100 * r['move']:14.2f} | {100 * r['demo_move']:12.2f} | "
            f"{100 * r['error']:5.2f} | {r['cosine']:6.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
