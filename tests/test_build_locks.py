"""tools/build_cpu_ops.py removes the build locks of torch extensions that a killed build left, and keeps the
one a running build holds."""

from __future__ import annotations

import os
import subprocess
import sys

from support import ROOT
from support.runs import environment


def test_stale_build_locks_go_and_a_held_one_stays(tmp_path):
    stale, held = tmp_path / "py311_cpu" / "cpu_adam" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (stale, held):
        lock.parent.mkdir(parents=True)
    stale.touch()
    fd = os.open(held, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while it builds
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "build_cpu_ops.py"), "--locks_only"],
            env=environment(TORCH_EXTENSIONS_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not stale.exists() and held.exists()
    assert result.stdout == f"removed {stale}: a build that no longer runs left it\n"
