"""Downloads the authors' Push-T demonstrations (pusht.zip) and unpacks the replay buffer.

Usage: python scripts/download_pusht.py [--dest data/pusht/pusht_cchi_v7_replay.zarr]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffusion_policy.data.download import PUSHT_MEMBER, PUSHT_URL, ensure_pusht
from diffusion_policy.data.errors import DatasetError

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest",
        type=Path,
        default=REPO_ROOT / "data" / PUSHT_MEMBER,
        help="where the .zarr store goes (default: %(default)s)",
    )
    parser.add_argument("--url", default=PUSHT_URL, help="archive URL (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = ensure_pusht(args.dest, download=True, url=args.url)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Push-T replay buffer ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
