"""Peak memory against the number of segments, each measured in a fresh process by tools/bench_memory.py.

The measured processes run on jemalloc (installed by tools/test.sh): under glibc, RSS grows through
fragmentation rather than live memory (see rmt_scale/allocator.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_scale.allocator import allocator_env

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_memory.py"


def peak_rss_mb(kind: str, mode: str, segments: int) -> float:
    env, _ = allocator_env("jemalloc")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(BENCH), "--segment_size", "256", "--threads", "1", "--min_seconds", "0",
           "--one", f"{kind}:{mode}:{segments}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpoint", "replay"])
def test_training_memory_does_not_grow_with_segments(mode):
    short, long = peak_rss_mb("rmt", mode, 2), peak_rss_mb("rmt", mode, 48)
    assert long < 1.1 * short, (short, long)


@pytest.mark.slow
def test_plain_bptt_memory_does_grow_so_the_measure_can_tell():
    short, long = peak_rss_mb("rmt", "bptt", 2), peak_rss_mb("rmt", "bptt", 48)
    assert long > short + 500, (short, long)


@pytest.mark.slow
def test_streaming_inference_memory_is_constant():
    short, long = peak_rss_mb("stream", "-", 4), peak_rss_mb("stream", "-", 192)
    assert long < 1.05 * short, (short, long)
