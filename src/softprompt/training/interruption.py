"""Stopping a run cleanly: SIGTERM and SIGINT become a flag the training loop reads after each step, so it can write
a checkpoint before it exits."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from ..errors import SoftPromptError


class TrainingInterrupted(SoftPromptError):
    """SIGTERM or SIGINT arrived; a checkpoint was written first."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


def interrupted(number: int, step: int, checkpoint: Path | None) -> TrainingInterrupted:
    """The error that ends a run for signal `number` after `step`, naming the `checkpoint` written first."""
    return TrainingInterrupted(
        f"{signal.Signals(number).name} received: stopped after step {step}"
        + (f", checkpoint written to {checkpoint}" if checkpoint else "")
        + ". Run the same command with --resume to continue.",
        number,
    )


@contextlib.contextmanager
def signals_caught():
    """SIGTERM and SIGINT set a flag that the loop reads after each step. A repeat within 2 s is the same request
    (launchers forward a terminal's Ctrl-C to processes that already got it); a later one stops at once."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield caught
        return
    first = []

    def handler(number, _frame):
        if not caught:
            caught.append(number)
            first.append(time.monotonic())
        elif time.monotonic() - first[0] > 2:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


