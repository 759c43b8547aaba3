"""Generates the BlockPush demonstrations with the scripted oracle (successful episodes only).

Usage: python scripts/generate_blockpush.py [--layout paper] [--n-episodes 1000] [--seed 0]
       [--exec-noise 0] [--detour-prob 0] [--drift-prob 0]
       [--dest data/blockpush/blockpush_<layout>_v3.zarr]

Prints the oracle's success rate over the seeds tried, the time taken and the demos' mode
fractions (which block first x which zone block 0 goes to).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffusion_policy.data.blockpush_dataset import blockpush_store_path
from diffusion_policy.envs.blockpush_env import LAYOUTS
from diffusion_policy.envs.blockpush_oracle import generate_blockpush
from diffusion_policy.envs.blockpush_scoring import demo_mode_fractions, demo_pace

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="the .zarr store to write (replaced if present; default: "
        "data/blockpush/blockpush_<layout>_v3.zarr)",
    )
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="paper", help="initial poses (default: %(default)s)"
    )
    parser.add_argument("--n-episodes", type=int, default=1000, help="successful episodes")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed")
    parser.add_argument(
        "--exec-noise",
        type=float,
        default=0.0,
        help="std (m) of noise on the executed moves; the oracle's own moves are recorded",
    )
    parser.add_argument(
        "--detour-prob",
        type=float,
        default=0.0,
        help="chance per step of a detour: a few executed moves toward a random point; the "
        "oracle's own moves are recorded",
    )
    parser.add_argument(
        "--drift-prob",
        type=float,
        default=0.0,
        help="chance per pushing step of a drift: a few executed moves offset across the push; "
        "the oracle's own moves are recorded",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.n_episodes < 1:
        print(f"error: --n-episodes={args.n_episodes} must be >= 1", file=sys.stderr)
        return 2
    if args.exec_noise < 0:
        print(f"error: --exec-noise={args.exec_noise} must be >= 0", file=sys.stderr)
        return 2
    if not 0 <= args.detour_prob < 1:
        print(f"error: --detour-prob={args.detour_prob} must be in [0, 1)", file=sys.stderr)
        return 2
    if not 0 <= args.drift_prob < 1:
        print(f"error: --drift-prob={args.drift_prob} must be in [0, 1)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dest = args.dest or REPO_ROOT / blockpush_store_path(args.layout)
    stats = generate_blockpush(
        dest,
        n_episodes=args.n_episodes,
        seed=args.seed,
        progress=not args.no_progress,
        exec_noise=args.exec_noise,
        layout=args.layout,
        detour_prob=args.detour_prob,
        drift_prob=args.drift_prob,
    )
    print(
        f"wrote {stats['n_episodes']} episodes ({stats['n_steps']} steps) to {dest} in "
        f"{stats['seconds']:.1f}s; oracle success {stats['oracle_success_rate']:.3f} "
        f"over {stats['n_tried']} seeds"
    )
    for key, value in {**demo_mode_fractions(dest), **demo_pace(dest)}.items():
        print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
