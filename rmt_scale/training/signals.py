"""Stop requests (SIGUSR1 from a scheduler before its time limit, SIGTERM), recorded from process start.

A signal only sets a flag: the trainer acts on it at the end of the current step, on all ranks together,
by writing a checkpoint and exiting with EXIT_PREEMPTED. Installing the handlers at start-up, rather than
when training begins, keeps a signal that arrives while the model is being built from killing the process
(Python's default for SIGUSR1 is to terminate).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: int | None = None


def install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)


def received() -> int | None:
    """The last stop signal received since install(), or None."""
    return _received


def _record(signum, frame) -> None:
    global _received
    _received = signum
