"""Training to a wall-clock budget, with the learning-rate schedule fitted to it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Schedules after warm-up, as a factor of the base learning rate at progress p in [0, 1].
_DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
    "constant": lambda p: 1.0,
}


class TimeBudget:
    """A clock of training time that stops while the run evaluates.

    The budget counts what the trainer does to learn (steps, validation losses, checkpoints)
    and leaves out rollout evaluations, which :meth:`paused` wraps, so runs that evaluate more
    or less often get the same training time. The spent time is saved in checkpoints, so a
    resumed run ends when the original would have.

    Args:
        minutes: The budget; ``None`` counts the time without a limit.
    """

    def __init__(self, minutes: float | None) -> None:
        if minutes is not None and not minutes > 0:
            raise ValueError(f"a time budget of {minutes!r} minutes: it must be > 0")
        self.seconds = math.inf if minutes is None else 60.0 * minutes
        self._spent = 0.0  # before the last start
        self._started: float | None = None

    @property
    def limited(self) -> bool:
        """Whether there is a budget."""
        return math.isfinite(self.seconds)

    def start(self) -> None:
        """Starts (or continues) counting."""
        if self._started is None:
            self._started = time.monotonic()

    def stop(self) -> None:
        """Stops counting, keeping the time spent."""
        if self._started is not None:
            self._spent += time.monotonic() - self._started
            self._started = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the enclosed time (a rollout evaluation) out of the budget."""
        running = self._started is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    @property
    def spent(self) -> float:
        """Seconds of the budget used."""
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self._spent + running

    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]."""
        return min(self.spent / self.seconds, 1.0)

    @property
    def exhausted(self) -> bool:
        """Whether the budget is used up."""
        return self.spent >= self.seconds

    def state_dict(self) -> dict[str, float]:
        """The time spent, for checkpoints."""
        return {"spent": self.spent}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restores the time spent from :meth:`state_dict`."""
        self._spent = float(state["spent"])
        if self._started is not None:
            self._started = time.monotonic()


def budget_lr_schedule(
    optimizer: Optimizer,
    budget: TimeBudget,
    name: str = "cosine",
    num_warmup_steps: int = 0,
) -> LambdaLR:
    """A learning-rate schedule over the time budget instead of a number of steps.

    The rate warms up linearly over ``num_warmup_steps`` optimizer steps, then follows
    ``name`` over the fraction of the budget spent, so it reaches its end (zero for cosine and
    linear) when the time does, however fast the machine is.

    Args:
        optimizer: The optimizer whose rates it sets.
        budget: The run's :class:`TimeBudget`.
        name: ``cosine``, ``linear`` or ``constant``.
        num_warmup_steps: Optimizer steps of linear warm-up.

    Returns:
        A ``LambdaLR``; call ``step()`` after each optimizer step, as with any scheduler.
    """
    if name not in _DECAYS:
        raise ValueError(
            f"lr_scheduler.name={name!r} has no time-budget form; with trainer.max_minutes "
            f"use one of {sorted(_DECAYS)}"
        )
    decay = _DECAYS[name]

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / num_warmup_steps) if num_warmup_steps > 0 else 1.0
        return warmup * decay(budget.progress)

    return LambdaLR(optimizer, factor)
