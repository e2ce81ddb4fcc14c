#!/usr/bin/env python
"""Training throughput and peak memory of the RMT and the ARMT against their backbone and against full attention.

Each configuration runs in a fresh process of the profiler's measuring core (rmt_scale/profiling/measure.py),
so that its peak RSS is its own. Throughput counts input tokens (memory tokens excluded) per second of
forward+backward (the fastest step), batch size 1, loss on every token: per second of wall time, and per
CPU second of the measuring process, which other jobs on a shared machine slow down much less.

    python tools/bench_memory.py                       # the opt-bench backbone, 1..256 segments
    python tools/bench_memory.py --segments 1 4 --modes replay --out bench.json
    # the 1M-token rows of the launcher's tiny default (8,929 segments of 112 tokens; minutes per mode)
    python tools/bench_memory.py --backbone opt-quickstart --segment_size 112 --num_mem_tokens 8 --threads 1 \
        --segments 1 8929 --modes checkpoint replay --min_seconds 3
    # the launcher's default ARMT, and the RMT, trained on 1,000,000 tokens with sublinear backprop
    python tools/bench_memory.py --backbone opt-quickstart --segment_size 100 --num_mem_tokens 8 --threads 1 \
        --segments 1 10000 --memory armt rmt --modes sublinear --full_attention_max_tokens 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from rmt_scale.model.config import BACKPROP_MODES
from rmt_scale.model.presets import BACKBONE_PRESETS
from rmt_scale.profiling.measure import FULL_ATTENTION, Measurer, Variant
from rmt_scale.runtime.allocator import ALLOCATORS

DEFAULT_SEGMENTS = [1, 4, 16, 64, 256]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backbone",
        default="opt-bench",
        choices=sorted(BACKBONE_PRESETS),
        help="tiny backbone to measure (default: %(default)s; the launcher's default is opt-quickstart)",
    )
    parser.add_argument(
        "--segments",
        type=int,
        nargs="+",
        default=DEFAULT_SEGMENTS,
        help="numbers of segments to measure (default: %(default)s)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["bptt", "checkpoint", "replay"],
        choices=BACKPROP_MODES,
        help="backprop modes to measure (default: %(default)s)",
    )
    parser.add_argument(
        "--memory",
        nargs="+",
        default=["rmt"],
        choices=["rmt", "armt"],
        help="memory models to measure (default: %(default)s; armt: the launcher's default ARMT settings)",
    )
    parser.add_argument("--segment_size", type=int, default=512, help="tokens per segment (default: 512)")
    parser.add_argument("--num_mem_tokens", type=int, default=16, help="memory tokens (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument(
        "--full_attention_max_tokens",
        type=int,
        default=32768,
        help="longest input tried with full attention (default: %(default)s)",
    )
    parser.add_argument(
        "--bptt_max_segments",
        type=int,
        default=256,
        help="longest input tried in 'bptt' mode, whose memory grows with length (default: 256, "
        "about 12 GB with the defaults)",
    )
    parser.add_argument(
        "--min_seconds",
        type=float,
        default=3.0,
        help="repeat short measurements until they last this long (default: 3)",
    )
    parser.add_argument(
        "--allocator",
        default="auto",
        choices=ALLOCATORS,
        help="CPU allocator of the measured processes; auto = jemalloc when installed, which keeps "
        "RSS from growing through glibc fragmentation (see rmt_scale/runtime/allocator.py)",
    )
    parser.add_argument("--out", default="bench_memory.json", help="where to write the JSON results")
    return parser.parse_args(argv)


def measure(measurer: Measurer, kind: str, mode: str, segments: int, args: argparse.Namespace) -> dict | None:
    """One training step of kind 'backbone' (the plain backbone), 'full' (the same, on the whole input), 'rmt' or
    'armt'."""
    length = args.segment_size * segments
    variant = (
        Variant(kind, mode, args.segment_size, args.num_mem_tokens)
        if kind in ("rmt", "armt")
        else Variant(FULL_ATTENTION, FULL_ATTENTION)
    )
    result = measurer.measure(variant, length, forward=False)
    if not result.ok:
        print(f"  {kind}/{mode}/{segments}: failed ({result.error})", file=sys.stderr)
        return None
    return {
        "kind": kind,
        "mode": mode,
        "segments": segments,
        "tokens": length,
        "tokens_per_s": round(length / result.train_seconds, 1),
        "tokens_per_cpu_s": round(length / result.train_cpu_seconds, 1),
        "peak_rss_mb": round(result.rss_before_mb + result.train_peak_mb, 1),
        "seconds_per_step": round(result.train_seconds, 3),
        "cpu_seconds_per_step": round(result.train_cpu_seconds, 3),
    }


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    jobs = [("backbone", "-", 1)]
    for segments in args.segments:
        jobs += [
            (memory, mode, segments)
            for memory in args.memory
            for mode in args.modes
            if mode != "bptt" or segments <= args.bptt_max_segments
        ]
        # at one segment, full attention is the backbone row
        if 1 < segments and segments * args.segment_size <= args.full_attention_max_tokens:
            jobs.append(("full", "-", segments))
    return jobs


def table(results: list[dict], bound: float) -> str:
    """One row a run; ``vs 1 seg`` is its tokens/s over the same model's and mode's at one segment."""
    one_segment = {(r["kind"], r["mode"]): r["tokens_per_s"] for r in results if r["segments"] == 1}
    lines = [
        f"{'model':<18}{'segments':>9}{'tokens':>9}{'tok/s':>10}{'vs bound':>10}{'vs 1 seg':>10}{'tok/CPU-s':>11}"
        f"{'peak RSS MB':>13}",
        "-" * 90,
    ]
    for r in results:
        name = r["kind"] if r["mode"] == "-" else f"{r['kind']}/{r['mode']}"
        single = one_segment.get((r["kind"], r["mode"]))
        versus = f"{r['tokens_per_s'] / single:>10.2f}" if single else f"{'-':>10}"
        lines.append(
            f"{name:<18}{r['segments']:>9}{r['tokens']:>9}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / bound:>10.2f}"
            f"{versus}{r['tokens_per_cpu_s']:>11.0f}{r['peak_rss_mb']:>13.0f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    measurer = Measurer(
        args.backbone,
        threads=args.threads,
        repeats=1,
        min_seconds=args.min_seconds,
        allocator=args.allocator,
        count_flops=False,
    )
    results = []
    for kind, mode, segments in tqdm(plan(args), desc="bench_memory", unit="run"):
        result = measure(measurer, kind, mode, segments, args)
        if result:
            results.append(result)
    backbone = next(r for r in results if r["kind"] == "backbone")
    # the RMT processes 2*M memory tokens per segment that are not counted as input tokens
    bound = backbone["tokens_per_s"] * args.segment_size / (args.segment_size + 2 * args.num_mem_tokens)
    summary = {
        "settings": vars(args),
        "allocator_used": measurer.allocator,
        "throughput_bound_tokens_per_s": round(bound, 1),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    print(
        f"\nallocator: {measurer.allocator}; bound = backbone {backbone['tokens_per_s']:.0f} tok/s"
        f" x {args.segment_size}/{args.segment_size + 2 * args.num_mem_tokens} = {bound:.0f} tok/s"
    )
    print(table(results, bound))


if __name__ == "__main__":
    main()
