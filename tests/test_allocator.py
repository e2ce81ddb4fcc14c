"""The allocator policy of rmt_scale/runtime/allocator.py applied to a running process: launchers/train.py restarts
itself under jemalloc (installed by tools/test.sh), once, before anything else. A real training run of the
launcher reporting jemalloc is in test_train_e2e.py (results.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_scale.runtime.allocator import ALLOCATOR_VARIABLE, JEMALLOC_CONF, find_jemalloc

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "launchers" / "train.py")

# each start of the process prints "start", then the allocator it ended up on; the module is run from its file,
# as the launcher does, so that no start imports torch
PROGRAM = f"""
print("start", flush=True)
import runpy
allocator = runpy.run_path({str(ROOT / "rmt_scale" / "runtime" / "allocator.py")!r})
allocator["restart_with_allocator"]()
print(allocator["current_allocator"]())
"""


def run_python(args: list[str], timeout_s: float = 60, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **variables}
    for name in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_THRESHOLD_", ALLOCATOR_VARIABLE):
        if name not in variables:
            env.pop(name, None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def test_a_process_restarts_once_under_jemalloc():
    result = run_python(["-c", PROGRAM])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["start", "start", "jemalloc"]


def test_glibc_keeps_the_process_as_it_is():
    result = run_python(["-c", PROGRAM], **{ALLOCATOR_VARIABLE: "glibc"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["start", "glibc"]


def test_a_process_already_under_jemalloc_does_not_restart():
    result = run_python(["-c", PROGRAM], LD_PRELOAD=find_jemalloc(), MALLOC_CONF=JEMALLOC_CONF)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["start", "jemalloc"]


def test_the_launcher_applies_the_policy_first():
    """An unknown choice stops the launcher before it imports anything heavy, naming the variable."""
    result = run_python([LAUNCHER, "--help"], **{ALLOCATOR_VARIABLE: "tcmalloc"})
    assert result.returncode == 2
    assert f"{ALLOCATOR_VARIABLE}='tcmalloc' is unknown" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, allowed_mb",
    [
        # fixed-length encoder steps: measured about 1 MB; grew by 10 MB a step, without end, under jemalloc's thread
        # caches (300 MB here)
        (["--backbone", "tiny-bert", "--memory", "rmt", "--curriculum", "8"], 60),
        # decoder steps of 1..32 segments: measured 43 MB (a longer step than any before it); grew by 33 MB a step
        # while jemalloc kept every freed page (1 GB here)
        (["--memory", "rmt", "--memory_gate", "--curriculum", "32"], 150),
    ],
    ids=["encoder", "varying-length-decoder"],
)
def test_training_memory_stays_flat_under_the_launchers_allocator(model, allowed_mb, tmp_path):
    """The peak RSS stops growing once the first steps have run: from step 10 to step 40."""
    out = tmp_path / "run"
    result = run_python(
        [
            LAUNCHER,
            *model,
            "--max_steps",
            "40",
            "--eval_every",
            "1000",
            "--eval_segments",
            "1",
            "--eval_samples",
            "4",
            "--no-baseline",
            "--no-export",
            "--out_dir",
            str(out),
        ],
        # only a bound for a hung run: 40 steps took over 60 s on 2 cores shared with two busy processes
        timeout_s=900,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = {
        row["step"]: row["perf/peak_memory_mb"]
        for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "perf/peak_memory_mb" in row
    }
    assert json.loads((out / "results.json").read_text())["allocator"] == "jemalloc"
    assert peaks[40] - peaks[10] < allowed_mb, peaks


def test_peak_rss_is_the_processs_own_not_its_parents():
    """The launchers' peak RSS (perf/peak_memory_mb, eval.json) of a process started by a large one: Linux's
    ru_maxrss would report the parent's 1.5 GB."""
    ballast = bytearray(1500 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page, so that it is resident
    program = (
        f"import runpy; memory = runpy.run_path({str(ROOT / 'rmt_scale' / 'runtime' / 'memory.py')!r}); "
        "print(memory['peak_rss_mb']())"
    )
    result = run_python(["-c", program])
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 200
    del ballast
