"""One run per output directory: rank 0 holds an exclusive ``flock`` on ``OUT/.lock`` for the run's lifetime.

Two runs in one directory would interleave their metrics and overwrite each other's checkpoints. The lock file
holds the holder's pid and host for the message; the file itself may outlive a killed run, but the kernel
releases the lock with its holder's last descriptor, so only a live run blocks another.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ..model.config import ConfigError
from .distributed import all_gather_objects

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(out_dir: Path, rank: int) -> Iterator[None]:
    """Holds the lock of ``out_dir`` (taken by rank 0) while the block runs. Raises ConfigError on every rank
    when another process holds it; under torch.distributed every rank must call this."""
    handle, refusal = _acquire(out_dir / LOCK_FILE) if rank == 0 else (None, None)
    refusal = next((problem for problem in all_gather_objects(refusal) if problem), None)
    if refusal:
        raise ConfigError(refusal)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _acquire(path: Path) -> tuple[TextIO | None, str | None]:
    """The open, locked file; or None and the message naming the holder."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid, host = (handle.read().split() + ["?", "?"])[:2]  # "?" if the holder has not written them yet
        handle.close()
        return None, (
            f"--out_dir {path.parent} is in use by pid {pid} on host {host}: wait for that run to end, or pass "
            "another --out_dir."
        )
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {socket.gethostname()}\n")
    handle.flush()
    return handle, None
