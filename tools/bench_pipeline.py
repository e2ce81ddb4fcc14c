#!/usr/bin/env python
"""How full the segment pipeline keeps its stages, and its step time against one process.

For each memory kind, number of stages P and number of segments S, P ranks (gloo, one thread each) run
training steps of a tiny OPT (``--backbone``) on one batch whose last 8 tokens are labelled (an answer): each
stage reports its busy fraction (compute time divided by step time) next to the schedule's ideal (ARMT:
S/(S+P-1) with one chain; RMT with C chains in flight: C*S / (S*max(P, C) + min(P, C) - 1)). The same batch
then trains in one process with one thread and ``backprop="replay"``, which recomputes each segment as a stage
does. Prints JSON and a table.

    python tools/bench_pipeline.py                               # S = 16 64 256, P = 2 4, ARMT and RMT
    python tools/bench_pipeline.py --segments 16 --stages 2 --memory armt --out quick.json

Each stage has one thread: on a machine with fewer cores than stages (4 stages on 2 cores) the stages share
cores and the busy fractions measure the machine, not the schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from rmt_scale.model.presets import BACKBONE_PRESETS

ANSWER_TOKENS = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backbone",
        default="opt-bench",
        choices=sorted(BACKBONE_PRESETS),
        help="tiny backbone; needs at least as many layers as stages (default: %(default)s, 4 layers)",
    )
    parser.add_argument(
        "--memory",
        nargs="+",
        default=["armt", "rmt"],
        choices=["armt", "rmt"],
        help="memory kinds to measure (default: %(default)s)",
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="pipeline stages (default: 2 4)")
    parser.add_argument(
        "--segments", type=int, nargs="+", default=[16, 64, 256], help="segments per sample (default: 16 64 256)"
    )
    parser.add_argument("--segment_size", type=int, default=64, help="tokens per segment (default: 64)")
    parser.add_argument("--num_mem_tokens", type=int, default=8, help="memory tokens (default: 8)")
    parser.add_argument(
        "--rmt_chains",
        type=int,
        default=0,
        help="RMT samples in flight (one chain each; default 0: twice the stages, so a chain's memory "
        "round trip has slack). ARMT runs one sample: its memory stays in each stage, so one "
        "chain fills the pipeline",
    )
    parser.add_argument(
        "--partition",
        default="uniform",
        choices=["uniform", "parameters"],
        help="layer split: 'uniform' gives each stage the same number of layers (default; the LM "
        "head runs only on the last 8 tokens, the answer, as in the tasks); 'parameters' "
        "charges the last stage the head as if every token were labelled",
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="measured steps after one warm-up (default: 2; the fastest counts)"
    )
    parser.add_argument("--out", default="bench_pipeline.json", help="where to write the JSON results")
    parser.add_argument(
        "--plot",
        default="bench_pipeline.png",
        help="PNG of the measured schedule (stages x time) of the shortest runs with the fewest "
        "stages, one panel per memory kind (default: %(default)s; '' for none)",
    )
    parser.add_argument("--worker", nargs=4, metavar=("MEMORY", "SEGMENTS", "CHAINS", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build(args: argparse.Namespace, memory: str, backprop: str):
    import torch
    import transformers

    from rmt_scale import ARMTConfig, RecurrentMemoryModel, RMTConfig
    from rmt_scale.model.presets import preset_config

    torch.manual_seed(0)
    backbone = transformers.AutoModelForCausalLM.from_config(preset_config(args.backbone))
    config_class = ARMTConfig if memory == "armt" else RMTConfig
    config = config_class(num_mem_tokens=args.num_mem_tokens, segment_size=args.segment_size, backprop=backprop)
    return RecurrentMemoryModel(backbone, config).train()


def batch(args: argparse.Namespace, samples: int, segments: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (samples, segments * args.segment_size), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]  # as in the tasks: only the answer is labelled
    return input_ids, torch.ones_like(input_ids), labels


def worker(args: argparse.Namespace) -> None:
    """One stage (RANK of WORLD_SIZE): measured steps, written by rank 0 as JSON to OUT."""
    import torch
    import torch.distributed as dist

    from rmt_scale.pipeline import PipelineStage, SegmentPipeline, head_cost_in_layers

    memory, segments, chains, out = args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, stages = dist.get_rank(), dist.get_world_size()
    model = build(args, memory, "replay")
    head_cost = head_cost_in_layers(model) if args.partition == "parameters" else 0.0
    stage = PipelineStage(model, rank, stages, head_cost)
    tied = dist.new_group([0, stages - 1]) if stages > 1 and stage.tied_head else None
    pipeline = SegmentPipeline(stage, list(range(stages)), chains=chains, tied_group=tied)
    data = batch(args, chains, segments, model.backbone.config.vocab_size)
    measured = []
    for _ in range(args.steps + 1):
        for param in model.parameters():
            param.grad = None
        dist.barrier()
        measured.append(pipeline.forward_backward(*data))
    best = min(measured[1:], key=lambda m: m.step_s)
    shares = [None] * stages
    dist.all_gather_object(shares, {"busy_s": best.busy_s, "step_s": best.step_s, "timeline": best.timeline})
    if rank == 0:
        Path(out).write_text(json.dumps(shares))
    dist.destroy_process_group()


def run_stages(args: argparse.Namespace, memory: str, stages: int, segments: int, chains: int) -> list[dict]:
    out = Path(args.out).with_suffix(f".{memory}-{stages}-{segments}.tmp")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": str(stages),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29700 + stages * 7 + segments % 97),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, __file__, *passthrough(args), "--worker", memory, str(segments), str(chains), str(out)]
    ranks = [
        subprocess.Popen(command, env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
        for rank in range(stages)
    ]
    errors = [rank.communicate()[1] for rank in ranks]
    if any(rank.returncode for rank in ranks):
        raise RuntimeError(f"{memory} P={stages} S={segments} failed:\n" + "\n".join(e[-2000:] for e in errors))
    shares = json.loads(out.read_text())
    out.unlink()
    return shares


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--backbone",
        args.backbone,
        "--segment_size",
        str(args.segment_size),
        "--num_mem_tokens",
        str(args.num_mem_tokens),
        "--steps",
        str(args.steps),
        "--partition",
        args.partition,
    ]


def one_process_seconds(args: argparse.Namespace, memory: str, segments: int, samples: int) -> float:
    """The fastest of the measured steps of the whole model in this process, one thread, replay."""
    import torch

    torch.set_num_threads(1)
    model = build(args, memory, "replay")
    data = batch(args, samples, segments, model.backbone.config.vocab_size)
    times = []
    for _ in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        model(*data[:2], labels=data[2]).loss.backward()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def plot(results: list[dict], path: str) -> None:
    """Each stage's forward and backward items over time, for the first run of each memory kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [
        next(r for r in results if r["memory"] == memory) for memory in dict.fromkeys(r["memory"] for r in results)
    ]
    figure, axes = plt.subplots(
        len(shown), 1, figsize=(12, 1.2 + 0.9 * max(r["stages"] for r in shown) * len(shown)), squeeze=False
    )
    for axis, result in zip(axes[:, 0], shown):
        for stage, timeline in enumerate(result["timelines"]):
            for kind, _segment, chain, start, end in timeline:
                colour = (
                    ("tab:blue", "tab:cyan")[chain % 2] if kind == "forward" else ("tab:red", "tab:orange")[chain % 2]
                )
                axis.barh(stage, end - start, left=start, height=0.8, color=colour, edgecolor="white", linewidth=0.3)
        axis.set_yticks(range(result["stages"]), [f"stage {s}" for s in range(result["stages"])])
        axis.invert_yaxis()
        axis.set_xlabel("seconds into the step")
        axis.set_title(
            f"{result['memory'].upper()}: {result['segments']} segments, {result['chains']} chain(s), "
            f"P={result['stages']} - forward (blue) then backward (red, last segment first); "
            f"busy {', '.join(f'{b:.2f}' for b in result['busy_fraction'])} vs ideal "
            f"{result['ideal_busy_fraction']:.2f}",
            fontsize=9,
        )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    lines = [
        f"{'memory':<7}{'P':>3}{'S':>5}{'chains':>7}{'step s':>9}{'1 proc s':>10}{'speed-up':>9}"
        f"{'ideal':>7}  busy fraction per stage (÷ ideal)",
        "-" * 100,
    ]
    for r in results:
        busy = "  ".join(f"{b:.2f} ({b / r['ideal_busy_fraction']:.2f})" for b in r["busy_fraction"])
        lines.append(
            f"{r['memory']:<7}{r['stages']:>3}{r['segments']:>5}{r['chains']:>7}{r['step_s']:>9.2f}"
            f"{r['one_process_s']:>10.2f}{r['one_process_s'] / r['step_s']:>9.2f}"
            f"{r['ideal_busy_fraction']:>7.2f}  {busy}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from rmt_scale.pipeline import ideal_busy_fraction

    jobs = [(m, p, s) for m in args.memory for p in args.stages for s in args.segments]
    results = []
    for memory, stages, segments in tqdm(jobs, desc="bench_pipeline", unit="run"):
        chains = 1 if memory == "armt" else (args.rmt_chains or 2 * stages)
        shares = run_stages(args, memory, stages, segments, chains)
        step_s = max(share["step_s"] for share in shares)
        results.append(
            {
                "memory": memory,
                "stages": stages,
                "segments": segments,
                "chains": chains,
                "tokens": chains * segments * args.segment_size,
                "step_s": round(step_s, 3),
                "one_process_s": round(one_process_seconds(args, memory, segments, chains), 3),
                "busy_fraction": [round(share["busy_s"] / share["step_s"], 3) for share in shares],
                "ideal_busy_fraction": round(ideal_busy_fraction(segments, stages, chains, memory == "armt"), 3),
                "timelines": [share["timeline"] for share in shares],
            }
        )
    if args.plot:
        order = sorted(results, key=lambda r: (r["stages"], r["segments"]))
        plot(order, args.plot)
    for result in results:
        del result["timelines"]  # in the plot; too long for the JSON
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "cpu_cores": os.cpu_count(),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
