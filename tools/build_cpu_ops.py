"""Builds DeepSpeed's CPU ops (Adam, shared-memory collectives) once, before the tests use them.

torch compiles an extension behind a ``lock`` file in its build directory, which the building process holds open
and removes when done. A build killed half-way (a test run stopped by hand, a timed-out test) leaves that file
behind, and every later build waits on it for ever. So first every ``lock`` under torch's extension root that no
running process holds open is removed, then the ops are built.

    python tools/build_cpu_ops.py               # what tools/test.sh runs
    python tools/build_cpu_ops.py --locks_only  # only remove the stale locks
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def open_files() -> set[Path]:
    """The files that some process of this machine (those whose descriptors we may read) has open."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            descriptors = list(fd_dir.iterdir())
        except OSError:  # the process ended, or is not ours to read
            continue
        for descriptor in descriptors:
            try:
                held.add(Path(os.readlink(descriptor)))
            except OSError:
                continue
    return held


def remove_stale_locks(root: Path) -> list[Path]:
    """Removes the build locks under ``root`` that no process holds open; returns them."""
    held = open_files()
    # an extension's directory is ROOT/NAME with TORCH_EXTENSIONS_DIR set, else ROOT/py311_cpu/NAME
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    stale = [lock for lock in locks if lock.resolve() not in held]
    for lock in stale:
        lock.unlink(missing_ok=True)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locks_only", action="store_true", help="remove stale build locks, build nothing")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in remove_stale_locks(root):
        print(f"removed {lock}: a build that no longer runs left it")
    if args.locks_only:
        return
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    CPUAdamBuilder().load(verbose=False)
    ShareMemCommBuilder().load(verbose=False)


if __name__ == "__main__":
    main()
