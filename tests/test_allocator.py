"""The allocator policy of rmt_scale/allocator.py applied to a running process: launchers/train.py restarts
itself under jemalloc (installed by tools/test.sh), once, before anything else. A real training run of the
launcher reporting jemalloc is in test_train_e2e.py (results.json)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rmt_scale.allocator import ALLOCATOR_VARIABLE, find_jemalloc

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "launchers" / "train.py")

# each start of the process prints "start", then the allocator it ended up on; the module is run from its file,
# as the launcher does, so that no start imports torch
PROGRAM = f"""
print("start", flush=True)
import runpy
allocator = runpy.run_path({str(ROOT / "rmt_scale" / "allocator.py")!r})
allocator["restart_with_allocator"]()
print(allocator["current_allocator"]())
"""


def run_python(args: list[str], **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **variables}
    for name in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_THRESHOLD_", ALLOCATOR_VARIABLE):
        if name not in variables:
            env.pop(name, None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_process_restarts_once_under_jemalloc():
    result = run_python(["-c", PROGRAM])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["start", "start", "jemalloc"]


def test_glibc_keeps_the_process_as_it_is():
    result = run_python(["-c", PROGRAM], **{ALLOCATOR_VARIABLE: "glibc"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["start", "glibc"]


def test_a_process_already_under_jemalloc_does_not_restart():
    result = run_python(["-c", PROGRAM], LD_PRELOAD=find_jemalloc(), MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["start", "jemalloc"]


def test_the_launcher_applies_the_policy_first():
    """An unknown choice stops the launcher before it imports anything heavy, naming the variable."""
    result = run_python([LAUNCHER, "--help"], **{ALLOCATOR_VARIABLE: "tcmalloc"})
    assert result.returncode == 2
    assert f"{ALLOCATOR_VARIABLE}='tcmalloc' is unknown" in result.stderr
