"""Choosing the CPU memory allocator of a process we start.

glibc's malloc fragments badly under per-segment recomputation: each checkpointed segment leaves small
long-lived autograd records between large freed activation buffers, and the process RSS keeps growing
with the number of segments even though live memory does not. jemalloc (Debian: ``libjemalloc2``) keeps
it flat at the same speed, as PyTorch's CPU performance guide recommends. Without jemalloc, a fixed
128 KiB mmap threshold makes glibc hand large buffers back to the OS on free (slower: each activation
buffer is then mapped afresh). Both can only be chosen when a process starts, so this module prepares the
environment of a child.
"""

from __future__ import annotations

import glob
import os

JEMALLOC_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so*",
)
ALLOCATORS = ("auto", "jemalloc", "glibc")


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
        raise ValueError("jemalloc was asked for but is not installed: apt-get install libjemalloc2, "
                         "or pass --allocator glibc.")
    if library is None:
        if choice == "auto":
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
            return env, "glibc (mmap threshold 128 KiB)"
        return env, "glibc"
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
    # Freed pages stay with the process for reuse: purging them (jemalloc's default after 10 s) makes a
    # long BPTT step, which frees and re-allocates gigabytes, fault them all in again (measured 20% slower).
    env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return env, "jemalloc"
