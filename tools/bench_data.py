#!/usr/bin/env python
"""Benchmark the data pipeline: sample generation and streaming shards into model batches.

Shards are read as training reads them: ShardStream, through webdataset's tar stages over fsspec streams.
The batches are those of training: rmt_scale.data.collate, padded to whole segments. Prints a table and
JSON (also written to --out). Targets for 1M-token samples: shards -> samples >= 100M tokens/s, shards ->
segment batches >= 50M tokens/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from torch.utils.data import DataLoader

from rmt_scale.data import (
    ShardStream,
    TaskGenerator,
    build_word_tokenizer,
    collate,
    default_background,
    whole_segments,
    write_shards,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="reason", help="task to generate")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens per sample")
    p.add_argument("--samples", type=int, default=16, help="samples written and streamed per pass")
    p.add_argument("--shard-samples", type=int, default=4, help="samples per shard")
    p.add_argument("--segment-size", type=int, default=512, help="tokens per segment")
    p.add_argument("--batch-size", type=int, default=1, help="samples per segment batch")
    p.add_argument("--passes", type=int, default=3, help="streaming passes over the shards (best is reported)")
    p.add_argument("--dir", help="where to write shards (default: a temporary directory)")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def best_rate(run, passes: int) -> tuple[float, int]:
    """Tokens per second of the fastest pass (the others include cold caches and noise), and the tokens
    one pass delivered."""
    rates, counts = [], set()
    for _ in range(passes):
        start = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - start))
        counts.add(tokens)
    if len(counts) != 1:
        raise RuntimeError(f"passes over the same shards delivered different token counts: {sorted(counts)}")
    return max(rates), counts.pop()


def bench(args, shard_dir: str) -> dict:
    tokenizer = build_word_tokenizer()
    start = time.perf_counter()
    default_background(tokenizer)
    background_s = time.perf_counter() - start

    generator = TaskGenerator(args.task, tokenizer)
    start = time.perf_counter()
    samples = [generator.sample(i, args.tokens) for i in range(args.samples)]
    generate_s = (time.perf_counter() - start) / args.samples
    start = time.perf_counter()
    write_shards(samples, shard_dir, max_samples=args.shard_samples)
    write_s = (time.perf_counter() - start) / args.samples
    del samples

    def read_only():
        return sum(len(s.tokens) + len(s.answer) for s in ShardStream(shard_dir))

    def segment_batch(samples):
        return collate(samples, tokenizer.pad_id, whole_segments(samples, args.segment_size) * args.segment_size)

    def into_segments():
        batches = DataLoader(
            ShardStream(shard_dir), batch_size=args.batch_size, drop_last=True, collate_fn=segment_batch
        )
        return sum(int(batch["attention_mask"].sum()) for batch in batches)  # real tokens, padding excluded

    read_rate, read_tokens = best_rate(read_only, args.passes)
    segment_rate, segment_tokens = best_rate(into_segments, args.passes)
    return {
        "task": args.task,
        "tokens_per_sample": args.tokens,
        "samples": args.samples,
        "segment_size": args.segment_size,
        "batch_size": args.batch_size,
        "background_tokenize_s": background_s,
        "generate_sample_s": generate_s,
        "write_sample_s": write_s,
        "read_tokens": read_tokens,
        "read_tokens_per_s": read_rate,
        "segment_batch_tokens": segment_tokens,
        "segment_batch_tokens_per_s": segment_rate,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dir:
        result = bench(args, args.dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench(args, tmp)
    rows = [
        ("built-in background, tokenize once", f"{result['background_tokenize_s']:.3f} s"),
        (f"generate one {args.tokens:,}-token sample", f"{result['generate_sample_s'] * 1e3:.1f} ms"),
        ("encode + write one sample to a shard", f"{result['write_sample_s'] * 1e3:.1f} ms"),
        ("stream shards -> samples", f"{result['read_tokens_per_s'] / 1e6:.1f} M tokens/s"),
        (
            f"stream shards -> batches of {args.batch_size}, padded to {args.segment_size}-token segments",
            f"{result['segment_batch_tokens_per_s'] / 1e6:.1f} M tokens/s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
