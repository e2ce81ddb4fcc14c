"""Stop requests (SIGUSR1 from a scheduler before its time limit, SIGTERM, Ctrl-C's SIGINT), recorded from
process start.

A signal only sets a flag: the trainer acts on it at the end of the current step (or between batches of the
final evaluation), on all ranks together, by writing a checkpoint and exiting with EXIT_PREEMPTED. Installing
the handlers at start-up, rather than when training begins, keeps a signal that arrives while the model is
being built from killing the process (Python's default for SIGUSR1 is to terminate). A second Ctrl-C raises
KeyboardInterrupt as usual, for a user who will not wait for the checkpoint.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_received: int | None = None


def install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)


def received() -> int | None:
    """The last stop signal received since install(), or None."""
    return _received


def _record(signum, frame) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        signal.default_int_handler(signum, frame)
    _received = signum
