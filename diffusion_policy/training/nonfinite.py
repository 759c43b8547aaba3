"""NaN and inf in training: bad steps are skipped (up to a limit), bad weights never saved."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffusion_policy.training.checkpoint import load_checkpoint, nonfinite_tensors

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Too many training steps in a row had a NaN or infinite loss or gradient."""


class NonFiniteWeightsError(FloatingPointError):
    """The weights to checkpoint hold NaN or inf values; the checkpoint was not written."""


class SkippedSteps:
    """Counts the steps dropped for a NaN/inf loss or gradient; too many in a row stop the run.

    A skipped step changes nothing: no optimizer, learning-rate or EMA update, and the step
    count stays. So every saved checkpoint holds finite weights.

    Args:
        limit: ``trainer.max_nonfinite_steps``, the skipped steps in a row that stop the run.
        latest: The run's ``latest.ckpt``, named in the error as the place to go back to.
        run_dir: The run folder, for the resume command in the error.
    """

    def __init__(self, limit: int, latest: Path, run_dir: Path) -> None:
        self.limit = limit
        self.latest = latest
        self.run_dir = run_dir
        self.in_a_row = 0  # across epochs
        self.in_epoch = 0

    def good_step(self) -> None:
        """A finite step: the count in a row starts over."""
        self.in_a_row = 0

    def skip(self, loss: float, grad_norm: float, global_step: int) -> None:
        """Counts a dropped step after ``global_step``, and warns.

        Raises:
            NonFiniteLossError: ``limit`` steps in a row were skipped.
        """
        self.in_a_row += 1
        self.in_epoch += 1
        if self.in_a_row >= self.limit:
            saved = (
                f"The last good checkpoint {self.latest} is intact: fix the cause, then continue "
                f"with resume=true hydra.run.dir={self.run_dir}"
                if self.latest.exists()
                else "No checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"{self.limit} training steps in a row had a non-finite loss or gradient (last: "
                f"loss={loss}, gradient norm={grad_norm}) after step {global_step}; training "
                f"stopped (trainer.max_nonfinite_steps={self.limit}). Try a lower optimizer.lr "
                f"or trainer.grad_clip_norm, and check the data. {saved}."
            )
        log.warning(
            "skipped a training step after step %d: loss=%s, gradient norm=%s "
            "(%d in a row; training stops at %d)",
            global_step,
            loss,
            grad_norm,
            self.in_a_row,
            self.limit,
        )


def check_finite_weights(
    state: dict[str, Any], latest: Path, run_dir: Path, epoch: int, global_step: int
) -> None:
    """Refuses to checkpoint NaN/inf weights: the previous checkpoint stays the good one.

    Raises:
        NonFiniteWeightsError: Naming the first bad tensors and the checkpoint to go back to.
    """
    bad = nonfinite_tensors({"model": state["model"], "ema": state["ema"] or {}})
    if not bad:
        return
    previous = (
        f"{latest} (epoch {load_checkpoint(latest)['epoch']}) is the last good checkpoint, "
        f"untouched: fix the cause (a lower optimizer.lr, trainer.grad_clip_norm), then "
        f"continue with resume=true hydra.run.dir={run_dir}"
        if latest.exists()
        else "No checkpoint of this run was saved"
    )
    raise NonFiniteWeightsError(
        f"the weights hold NaN or inf values at epoch {epoch}, step {global_step} "
        f"({len(bad)} tensors, e.g. {', '.join(bad[:3])}); training stopped without writing "
        f"them. {previous}."
    )
