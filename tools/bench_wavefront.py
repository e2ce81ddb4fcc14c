#!/usr/bin/env python
"""Benchmark ARMT inference: wavefront (diagonal) execution against sequential execution.

Runs the opt-bench tiny backbone (d=256, 4 layers) wrapped as an ARMT, forward only under no_grad, on
random tokens of 8 to 256 segments, and reports tokens/s of both schedules and their ratio. Both schedules
are checked to give the same logits first. Prints a table and JSON (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import OPTForCausalLM

from rmt_scale import ARMTConfig, RecurrentMemoryModel
from rmt_scale.model.presets import preset_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--segments", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256], help="numbers of segments to measure"
    )
    p.add_argument("--segment-size", type=int, default=128, help="tokens per segment")
    p.add_argument("--mem-tokens", type=int, default=16, help="memory tokens per segment")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny OPT")
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch")
    p.add_argument(
        "--attention",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="backbone attention implementation (vmap batches eager attention fully; torch has no "
        "batching rule for CPU SDPA and loops over the cells of a diagonal there)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the fastest is reported)")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def build(args) -> RecurrentMemoryModel:
    torch.manual_seed(0)
    backbone = OPTForCausalLM(
        preset_config(
            "opt-bench",
            max_position_embeddings=args.segment_size + args.mem_tokens,
            num_hidden_layers=args.layers,
            attn_implementation=args.attention,
        )
    ).eval()
    config = ARMTConfig(num_mem_tokens=args.mem_tokens, segment_size=args.segment_size, d_mem=64)
    model = RecurrentMemoryModel(backbone, config).eval()
    with torch.no_grad():  # a memory that stores something, as after training
        for memory in model.associative.memories:
            memory.value.weight.normal_(std=0.02)
    return model


def seconds(model: RecurrentMemoryModel, execution: str, tokens: torch.Tensor, repeats: int) -> float:
    model.config.execution = execution
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            best = min(best, time.perf_counter() - start)
    return best


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    model = build(args)
    vocab = model.backbone.config.vocab_size
    check = torch.randint(3, vocab, (args.batch_size, 4 * args.segment_size))
    with torch.no_grad():
        model.config.execution = "sequential"
        sequential = model(check, return_logits=True).logits
        model.config.execution = "wavefront"
        difference = (model(check, return_logits=True).logits - sequential).abs().max().item()
    rows = []
    for num_segments in tqdm(args.segments, desc="segments"):
        tokens = torch.randint(3, vocab, (args.batch_size, num_segments * args.segment_size))
        seq_s = seconds(model, "sequential", tokens, args.repeats)
        wave_s = seconds(model, "wavefront", tokens, args.repeats)
        rows.append(
            {
                "segments": num_segments,
                "tokens": tokens.numel(),
                "sequential_tok_s": tokens.numel() / seq_s,
                "wavefront_tok_s": tokens.numel() / wave_s,
                "speedup": seq_s / wave_s,
            }
        )
    return {"settings": vars(args), "max_logit_difference": difference, "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    result = bench(args)
    print(f"max |logits wavefront - sequential| = {result['max_logit_difference']:.2e}")
    print("| segments | tokens | sequential tok/s | wavefront tok/s | wavefront / sequential |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        print(
            f"| {row['segments']} | {row['tokens']} | {row['sequential_tok_s']:.0f} | "
            f"{row['wavefront_tok_s']:.0f} | {row['speedup']:.2f}x |"
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
