"""FLOP, time and memory scaling report: RMT against full attention.

Prints analytic FLOP savings for the nine OPT sizes (reproducing the 1M-token paper's 29x / 295x),
measures small OPT-class backbones at increasing lengths (FLOPs counted by torch's FlopCounterMode,
cross-checked against DeepSpeed's FlopsProfiler on the same forward pass), writes report.md, report.json
and log-log PNG plots into --out, and ends with

    RMT FLOP slope: X
    full attention FLOP slope: Y

Exit status 1 when RMT's measured FLOP slope exceeds --flop-slope-limit or its peak memory grows with
length (forward in every mode, training in the checkpoint and replay modes), or when DeepSpeed's forward
MACs x 2 differ from FlopCounterMode's forward FLOPs by more than 1%, so CI can gate on it.

    python tools/profile_flops.py --quick --out /tmp/profile      # or: rmt-profile-flops --quick ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from ..model.presets import BACKBONE_PRESETS
from ..profiling import report
from ..profiling.measure import FULL_ATTENTION, MEMORY_KINDS, RMT_MODES, Measurer, Variant, backbone_config, sweep

# --quick: a micro backbone and short inputs, so the whole run stays well under two minutes on CPU.
# One thread: on a small shared box, two OpenMP threads fighting other processes for two cores made
# a 0.05 s step take 9 s.
QUICK = dict(backbone="opt-micro", lengths=[256, 512, 1024, 2048], segment_size=128, mem_tokens=4, repeats=1, threads=1)
FULL = dict(
    backbone="opt-bench",
    lengths=[512 * 2**k for k in range(7)],
    segment_size=512,
    mem_tokens=16,
    repeats=3,
    threads=None,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help=f"small and fast (< 2 min on CPU; used by the tests): {QUICK}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("profile_out"),
        help="directory for report.md, report.json, *.png (and tensorboard/); default: %(default)s",
    )
    parser.add_argument(
        "--backbone",
        help=f"measured backbone: a tiny one ({', '.join(BACKBONE_PRESETS)}), an OPT size such as "
        f"opt-125m (random weights), or a local Hugging Face model directory (its config only); "
        f"default: {FULL['backbone']}, with --quick {QUICK['backbone']}",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help=f"input lengths in tokens; default: {FULL['lengths']}, with --quick {QUICK['lengths']}",
    )
    parser.add_argument(
        "--segment-size",
        type=int,
        help=f"RMT input tokens per segment; default {FULL['segment_size']}, with --quick "
        f"{QUICK['segment_size']} (the analytic tables always use 512 and 16 memory tokens)",
    )
    parser.add_argument(
        "--mem-tokens",
        type=int,
        help=f"RMT memory tokens (each segment carries them twice: read and write); default "
        f"{FULL['mem_tokens']}, with --quick {QUICK['mem_tokens']}",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=RMT_MODES,
        default=list(RMT_MODES),
        help="RMT backprop modes to measure; default: all",
    )
    parser.add_argument(
        "--memory",
        nargs="+",
        choices=MEMORY_KINDS,
        default=list(MEMORY_KINDS),
        help="memory wrappers to measure in each mode: rmt (memory tokens), armt (associative "
        "memory in every layer); default: both. The slope gate covers all of them",
    )
    parser.add_argument("--no-full", action="store_true", help="skip the full-attention baseline")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed runs per measurement, the fastest is kept; default {FULL['repeats']}, "
        f"with --quick {QUICK['repeats']}",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per measurement; default: torch's own, with --quick 1"
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=0.6 * psutil.virtual_memory().available / 2**20,
        help="skip a variant's longer lengths once its training peak memory is predicted to "
        "exceed this; default: 60%% of the memory available now (%(default).0f MB)",
    )
    parser.add_argument(
        "--flop-slope-limit",
        type=float,
        default=1.05,
        help="fail when RMT's measured FLOP slope exceeds this; default %(default)s",
    )
    parser.add_argument(
        "--memory-slope-limit",
        type=float,
        default=0.15,
        help="fail when an RMT peak memory that should stay flat has a log-log slope above this; default %(default)s",
    )
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to OUT/tensorboard")
    args = parser.parse_args(argv)

    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("segment_size", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.mem_tokens < 0:
        parser.error("--mem-tokens must be >= 0")
    if any(n <= 0 for n in args.lengths):
        parser.error("--lengths must all be positive")
    try:
        backbone_config(args.backbone, max(args.lengths))
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    variants = [] if args.no_full else [Variant(FULL_ATTENTION, FULL_ATTENTION)]
    variants += [Variant(kind, mode, args.segment_size, args.mem_tokens) for kind in args.memory for mode in args.modes]
    measurer = Measurer(args.backbone, threads=args.threads, repeats=args.repeats)

    with tqdm(total=len(variants) * len(set(args.lengths)), desc="measuring", unit="run") as bar:

        def on_done(m):
            bar.set_postfix_str(f"{m.variant} @ {m.length}")
            bar.update()

        measurements = sweep(measurer, variants, args.lengths, args.memory_budget_mb, on_done)

    settings = dict(
        backbone=args.backbone,
        lengths=args.lengths,
        segment_size=args.segment_size,
        num_mem_tokens=args.mem_tokens,
        memory=args.memory,
        modes=args.modes,
        threads=measurer.threads,
        allocator=measurer.allocator,
        repeats=args.repeats,
        memory_budget_mb=args.memory_budget_mb,
        flop_slope_limit=args.flop_slope_limit,
        memory_slope_limit=args.memory_slope_limit,
        quick=args.quick,
    )
    result = report.build(settings, measurements)
    paths = report.write(result, args.out, with_tensorboard=args.tensorboard)

    print(report.markdown(result))
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - started:.0f} s")
    for failure in result["verdict"]["failures"]:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"RMT FLOP slope: {result['verdict']['rmt_flop_slope']:.3f}")
    print(f"full attention FLOP slope: {result['verdict']['full_flop_slope']:.3f}")
    return 0 if result["verdict"]["passed"] else 1
