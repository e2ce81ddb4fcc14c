"""Peak memory against the number of segments, each measured in a fresh process by the measuring core that
tools/bench_memory.py and tools/profile_flops.py use.

The measured processes run on jemalloc (installed by tools/test.sh): under glibc, RSS grows through
fragmentation rather than live memory (see rmt_scale/runtime/allocator.py)."""

from __future__ import annotations

import runpy
import time
from pathlib import Path

import pytest

from rmt_scale.profiling import measure
from rmt_scale.profiling.measure import Measurer, Variant

SEGMENT_SIZE = 256


def peak_rss_mb(mode: str, segments: int, train: bool = True) -> float:
    """Peak resident memory of the whole process, as tools/bench_memory.py reports it."""
    measurer = Measurer("opt-bench", threads=1, repeats=1, allocator="jemalloc", count_flops=False)
    result = measurer.measure(Variant("rmt", mode, SEGMENT_SIZE, 16), SEGMENT_SIZE * segments, train=train)
    assert result.ok, result.error
    return result.rss_before_mb + (result.train_peak_mb if train else result.forward_peak_mb)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpoint", "replay"])
def test_training_memory_does_not_grow_with_segments(mode):
    short, long = peak_rss_mb(mode, 2), peak_rss_mb(mode, 48)
    assert long < 1.1 * short, (short, long)


@pytest.mark.slow
def test_plain_bptt_memory_does_grow_so_the_measure_can_tell():
    short, long = peak_rss_mb("bptt", 2), peak_rss_mb("bptt", 48)
    assert long > short + 500, (short, long)


@pytest.mark.slow
def test_streaming_inference_memory_is_constant():
    short, long = peak_rss_mb("bptt", 4, train=False), peak_rss_mb("bptt", 192, train=False)
    assert long < 1.05 * short, (short, long)


def test_a_long_first_run_is_timed_instead_of_repeated(monkeypatch):
    """A first run of at least TIMED_WARMUP_SECONDS is the measurement (a 1M-token step is not run twice);
    shorter ones are a warm-up. The CPU time of a run that only waits is about zero."""
    calls = []

    def run(seconds):
        calls.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(measure, "TIMED_WARMUP_SECONDS", 0.2)
    wall, cpu = measure._fastest_of(1, 0.0, run, 0.25)
    assert len(calls) == 1 and wall >= 0.25 and cpu < 0.1
    calls.clear()
    measure._fastest_of(1, 0.0, run, 0.01)
    assert len(calls) == 2


def test_bench_memory_measures_one_segment_of_full_attention_once():
    """At one segment, full attention is the backbone row: the plan must not measure it twice."""
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bench_memory.py"))
    args = bench["parse_args"](["--segments", "1", "4", "--modes", "replay"])
    assert bench["plan"](args) == [("backbone", "-", 1), ("rmt", "replay", 1), ("rmt", "replay", 4), ("full", "-", 4)]
