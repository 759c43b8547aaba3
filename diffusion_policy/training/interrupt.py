"""Ctrl-C and SIGTERM during training: finish the step, save, and exit with the usual code."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving ``latest.ckpt``.

    Attributes:
        summary: Where it stopped and what was saved.
        resume_command: What continues the run; an entry point may spell out its full command.
        exit_code: 130 for SIGINT, 143 for SIGTERM (128 + the signal number).
    """

    def __init__(self, summary: str, resume_command: str, signum: int) -> None:
        super().__init__(summary)
        self.summary = summary
        self.resume_command = resume_command
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return f"{self.summary}; resume with {self.resume_command}"


class StopSignals:
    """Turns SIGINT and SIGTERM into a flag that the training loop reads after each step.

    While installed (``with stop_signals:``), the first signal sets :attr:`signum`; a second
    one, or one inside :meth:`immediate` (a rollout, which may run for minutes), raises
    ``KeyboardInterrupt`` at once. Outside the main thread nothing is installed.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._immediate = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Asks the loop to stop, as the signal ``signum`` does."""
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """Inside this block a signal raises ``KeyboardInterrupt`` at once."""
        self._immediate = True
        try:
            yield
        finally:
            self._immediate = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again = self.requested
        self.request(signum)
        if again or self._immediate:
            raise KeyboardInterrupt
