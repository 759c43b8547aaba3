"""Plots of run results for the analysis scripts (``scripts/aggregate.py``, learning curves)."""

from __future__ import annotations

import io
from pathlib import Path

from diffusion_policy.utils.atomic import atomic_write


def plot_lines(lines: dict[str, tuple], xlabel: str, ylabel: str, path: Path) -> None:
    """Writes a PNG of ``{label: (xs, scores)}``, scores on a 0..1 axis.

    The PNG is written atomically, with the project's file permissions.
    """
    import matplotlib  # imported here: only the scripts that plot need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(png.getvalue()))
