"""Choosing the CPU memory allocator of a process we start.

glibc's malloc fragments badly under per-segment recomputation: each checkpointed segment leaves small
long-lived autograd records between large freed activation buffers, and the process RSS keeps growing
with the number of segments even though live memory does not. jemalloc (Debian: ``libjemalloc2``) keeps
it flat at the same speed, as PyTorch's CPU performance guide recommends. Without jemalloc, a fixed
128 KiB mmap threshold makes glibc hand large buffers back to the OS on free (slower: each activation
buffer is then mapped afresh). Both can only be chosen when a process starts, so this module prepares the
environment of a child, or restarts the calling process in it (``restart_launcher``, which the launchers
call first thing, through ``restart_with_allocator``).
"""

from __future__ import annotations

import glob
import os
import sys

JEMALLOC_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so*",
)
ALLOCATORS = ("auto", "jemalloc", "glibc")
JEMALLOC_CONF = "tcache:false"
# the launcher's choice among ALLOCATORS, from the environment so that every rank of any launcher sees it
ALLOCATOR_VARIABLE = "RMT_ALLOCATOR"
# what allocator_env may set: a process whose environment already has these values runs under the policy
_ALLOCATOR_KEYS = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_THRESHOLD_")


def find_jemalloc() -> str | None:
    for pattern in JEMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def allocator_env(choice: str = "auto", base: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The environment for a child process using ``choice``, and the allocator it will really get."""
    if choice not in ALLOCATORS:
        raise ValueError(f"allocator {choice!r} is unknown: choose one of {', '.join(ALLOCATORS)}.")
    env = dict(os.environ if base is None else base)
    library = find_jemalloc() if choice != "glibc" else None
    if choice == "jemalloc" and library is None:
        raise ValueError(
            "jemalloc was asked for but is not installed: apt-get install libjemalloc2, "
            "or choose glibc (--allocator glibc; for launchers/train.py, RMT_ALLOCATOR=glibc)."
        )
    if library is None:
        if choice == "auto":
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
            return env, "glibc (mmap threshold 128 KiB)"
        return env, "glibc"
    preloaded = env.get("LD_PRELOAD", "").split(":")
    if library not in preloaded:
        env["LD_PRELOAD"] = ":".join(filter(None, [library, *preloaded]))
    # Without thread caches: with them, training an encoder grew by about 10 MB a step and never stopped
    # (1.2 GB after 70 steps, 524 MB flat without; decoders stayed flat either way, at the same speed).
    # Freed pages go back to the OS after jemalloc's default 10 s: kept forever (dirty_decay_ms:-1), steps of
    # varying length (a curriculum draws 1..n segments) never reuse them, and a gated RMT's steps of 1..32
    # segments grew by 33 MB a step (3.1 GB after 80 steps, 752 MB flat with the default decay).
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env, "jemalloc"


def restart_with_allocator(choice: str | None = None) -> None:
    """Replaces this process (same pid, arguments and interpreter options) by one started under ``choice``
    (default: ``$RMT_ALLOCATOR``, else ``auto``) unless it already runs under it. Call it before anything
    else: the process starts over. ``allocator_env`` leaves an environment that already has the policy
    unchanged, so the restarted process does not restart again."""
    choice = os.environ.get(ALLOCATOR_VARIABLE, "auto") if choice is None else choice
    if choice not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_VARIABLE}={choice!r} is unknown: set it to one of {', '.join(ALLOCATORS)}.")
    env, _ = allocator_env(choice)
    if all(env.get(key) == os.environ.get(key) for key in _ALLOCATOR_KEYS):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def current_allocator() -> str:
    """The allocator this process runs on, as ``allocator_env`` names it."""
    with open("/proc/self/maps") as maps:
        if "libjemalloc" in maps.read():
            return "jemalloc"
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"glibc (mmap threshold {int(threshold) // 1024} KiB)" if threshold else "glibc"


def restart_launcher() -> None:
    """``restart_with_allocator`` for a launcher's first line: a bad ``$RMT_ALLOCATOR`` exits with code 2 and the
    message, as the launchers' other bad input does."""
    try:
        restart_with_allocator()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
