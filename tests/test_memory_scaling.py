"""Peak memory against the number of segments, each measured in a fresh process by the measuring core that
tools/bench_memory.py and tools/profile_flops.py use.

The measured processes run on jemalloc (installed by tools/test.sh): under glibc, RSS grows through
fragmentation rather than live memory (see rmt_scale/allocator.py)."""

from __future__ import annotations

import pytest

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
