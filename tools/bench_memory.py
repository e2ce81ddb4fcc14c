#!/usr/bin/env python
"""Training throughput and peak memory of the RMT against its backbone and against full attention.

Each configuration runs in a fresh subprocess so that its peak RSS is its own. Throughput counts input
tokens (memory tokens excluded) per second of forward+backward, batch size 1, loss on every token.

    python tools/bench_memory.py                       # tiny OPT (docs/background.md), 1..256 segments
    python tools/bench_memory.py --segments 1 4 --modes replay --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_SEGMENTS = [1, 4, 16, 64, 256]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs="+", default=DEFAULT_SEGMENTS,
                        help="numbers of segments to measure (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=["bptt", "checkpoint", "replay"],
                        choices=["bptt", "checkpoint", "replay"], help="RMT backprop modes to measure")
    parser.add_argument("--segment_size", type=int, default=512, help="tokens per segment (default: 512)")
    parser.add_argument("--num_mem_tokens", type=int, default=16, help="memory tokens (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--full_attention_max_tokens", type=int, default=32768,
                        help="longest input tried with full attention (default: %(default)s)")
    parser.add_argument("--bptt_max_segments", type=int, default=256,
                        help="longest input tried in 'bptt' mode, whose memory grows with length (default: 256, "
                             "about 12 GB with the defaults)")
    parser.add_argument("--min_seconds", type=float, default=3.0,
                        help="repeat short measurements until they last this long (default: 3)")
    parser.add_argument("--allocator", default="auto", choices=["auto", "jemalloc", "glibc"],
                        help="CPU allocator of the measured processes; auto = jemalloc when installed, which keeps "
                             "RSS from growing through glibc fragmentation (see rmt_scale/allocator.py)")
    parser.add_argument("--out", default="bench_memory.json", help="where to write the JSON results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    return parser.parse_args(argv)


def measure(kind: str, mode: str, segments: int, args: argparse.Namespace) -> dict:
    """One measurement in this process. kind: 'backbone', 'rmt' or 'full' train one step;
    'stream' is RMT inference (no grad) over the whole input."""
    import resource

    import torch

    from rmt_scale import RecurrentMemoryModel, RMTConfig
    from rmt_scale.model.presets import tiny_opt

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    length = args.segment_size * segments
    # only full attention needs positions for the whole input; a bigger table would inflate the RMT's memory
    backbone = tiny_opt(max_positions=max(2048, length) if kind == "full" else 2048)
    if kind in ("rmt", "stream"):
        model = RecurrentMemoryModel(backbone, RMTConfig(args.num_mem_tokens, args.segment_size,
                                                         backprop=mode if kind == "rmt" else "bptt"))
        run = lambda ids: model(ids, labels=ids).loss  # noqa: E731
    else:
        run = lambda ids: backbone(ids, labels=ids).loss  # noqa: E731

    def train_step(tokens: int) -> None:
        ids = torch.randint(3, backbone.config.vocab_size, (1, tokens))
        if kind == "stream":
            with torch.no_grad():
                run(ids)
            return
        run(ids).backward()
        backbone.zero_grad(set_to_none=True)

    train_step(args.segment_size)  # warm-up on one segment
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < args.min_seconds:
        train_step(length)
        steps += 1
    seconds = (time.perf_counter() - start) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "mode": mode, "segments": segments, "tokens": length,
            "tokens_per_s": round(length / seconds, 1), "peak_rss_mb": round(peak_mb, 1),
            "seconds_per_step": round(seconds, 3)}


def run_isolated(kind: str, mode: str, segments: int, argv: list[str], env: dict[str, str]) -> dict | None:
    cmd = [sys.executable, __file__, *argv, "--one", f"{kind}:{mode}:{segments}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"  {kind}/{mode}/{segments}: failed ({done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    jobs = [("backbone", "-", 1)]
    for segments in args.segments:
        jobs += [("rmt", mode, segments) for mode in args.modes
                 if mode != "bptt" or segments <= args.bptt_max_segments]
        if segments * args.segment_size <= args.full_attention_max_tokens:
            jobs.append(("full", "-", segments))
    return jobs


def table(results: list[dict], bound: float) -> str:
    lines = [f"{'model':<16}{'segments':>9}{'tokens':>9}{'tok/s':>10}{'vs bound':>10}{'peak RSS MB':>13}",
             "-" * 67]
    for r in results:
        name = r["kind"] if r["kind"] != "rmt" else f"rmt/{r['mode']}"
        lines.append(f"{name:<16}{r['segments']:>9}{r['tokens']:>9}{r['tokens_per_s']:>10.0f}"
                     f"{r['tokens_per_s'] / bound:>10.2f}{r['peak_rss_mb']:>13.0f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.one:
        kind, mode, segments = args.one.split(":")
        print(json.dumps(measure(kind, mode, int(segments), args)))
        return
    from tqdm import tqdm

    from rmt_scale.allocator import allocator_env

    env, allocator = allocator_env(args.allocator)
    results = []
    for kind, mode, segments in tqdm(plan(args), desc="bench_memory", unit="run"):
        result = run_isolated(kind, mode, segments, argv, env)
        if result:
            results.append(result)
    backbone = next(r for r in results if r["kind"] == "backbone")
    # the RMT processes 2*M memory tokens per segment that are not counted as input tokens
    bound = backbone["tokens_per_s"] * args.segment_size / (args.segment_size + 2 * args.num_mem_tokens)
    summary = {"settings": {k: v for k, v in vars(args).items() if k != "one"}, "allocator_used": allocator,
               "throughput_bound_tokens_per_s": round(bound, 1), "results": results}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    print(f"\nallocator: {allocator}; bound = backbone {backbone['tokens_per_s']:.0f} tok/s x {args.segment_size}/"
          f"{args.segment_size + 2 * args.num_mem_tokens} = {bound:.0f} tok/s")
    print(table(results, bound))


if __name__ == "__main__":
    main()
