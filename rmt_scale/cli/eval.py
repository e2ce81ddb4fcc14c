"""Evaluate an exported RMT (the `export/` directory a training run writes) by input length.

    python launchers/eval.py --model runs/quickstart/export --eval_segments 1 4 16 64    # or: rmt-eval ...
    srun python launchers/eval.py --model ...      # with RANK/WORLD_SIZE/... exported (slurm/eval.sbatch)

Exact-answer accuracy on the same fixed evaluation samples training uses (task samples of whole segments,
read with streaming inference: what is held is the model, its memory, one segment's activations and the batch's
tokens at 4 bytes each). Prints a table and the peak RSS; rank 0 writes OUT/eval.json (accuracy by length, samples
per length, peak RSS, wall time), which tools/plot_results.py draws.

Language modelling (an lm run's export, ``--task lm --shards HELD_OUT``, the shards of tools/make_shards.py --task lm):
the loss and perplexity of each segment given the memory of the segments before it, next to the no-memory twin
(``--twin``, by default the run's baseline/export: each segment alone) and full attention (the twin's backbone
over the tokens before the segment, as far as its positions reach). Rank 0 writes OUT/results.json,
OUT/perplexity_by_segment.png and TensorBoard scalars in OUT/tensorboard. Exit codes: 0 done; 2 bad input (flags,
or a model directory that cannot be read); any other error, its traceback and 1. Like launchers/train.py, the
process restarts itself first under the CPU allocator of rmt_scale/runtime/allocator.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..runtime.allocator import restart_launcher
from .train import EXIT_CONFIG_ERROR


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model",
        required=True,
        help="directory written by save_pretrained (a run's export/), with its tokenizer/ inside",
    )
    parser.add_argument("--task", default="memorize", help="task of the evaluation samples, or lm (with --shards)")
    parser.add_argument("--shards", help="lm: held-out lm shards (tools/make_shards.py --task lm) to evaluate on")
    parser.add_argument(
        "--twin",
        help="lm: the no-memory twin's export directory (default: the run's baseline/export, written by a run "
        "with --baseline), or 'backbone': the model's own backbone without memory, the twin of a --freeze_backbone "
        "run; full attention runs the twin's backbone",
    )
    parser.add_argument(
        "--eval_segments",
        nargs="+",
        default="1,2,4,8,16,32",
        help="input lengths to evaluate, in segments: space- or comma-separated (1 4 16 or 1,4,16, as train.py); "
        "lm: the largest is the number of segments read",
    )
    parser.add_argument("--eval_samples", type=int, default=64, help="samples per length, split over ranks")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per forward on each rank")
    parser.add_argument(
        "--data_seed",
        type=int,
        default=0,
        help="the training run's --data_seed, so the evaluation samples are the same as its own",
    )
    parser.add_argument(
        "--out",
        help="directory for eval.json (default: runs/eval/NAME in the working directory, NAME the model "
        "directory's name, or its run's for a run's export/; never the model directory)",
    )
    return parser.parse_args(argv)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""

    def _get_help_string(self, action):
        # a flag without a default (None) says in its help what happens instead
        return action.help if action.default is None else super()._get_help_string(action)


def default_out(model_dir: Path) -> Path:
    """runs/eval/NAME: the model directory stays as it was (a reference checkpoint in the repository too)."""
    model_dir = model_dir.resolve()
    return Path("runs", "eval", model_dir.parent.name if model_dir.name == "export" else model_dir.name)


# --twin's name for the model's own backbone without memory: the twin of a --freeze_backbone run
TWIN_IS_BACKBONE = "backbone"


def default_twin(model_dir: Path) -> Path:
    """A run's export/ has its no-memory twin's in baseline/export next to it."""
    return model_dir.resolve().parent / "baseline" / "export"


def main(argv=None) -> int:
    # first of all, as it starts the process over: the CPU allocator policy of launchers/train.py (jemalloc when
    # installed, RMT_ALLOCATOR chooses), under which RSS stays flat over a long input's segments
    restart_launcher()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..runtime.device import select_accelerator

    select_accelerator()  # DS_ACCELERATOR=cpu without CUDA, before anything imports deepspeed
    args = parse_args(argv)
    started = time.perf_counter()
    from ..data import LM_TASK, AnswerClasses, TaskGenerator, load_tokenizer
    from ..model import ConfigError, RecurrentMemoryModel
    from ..runtime.memory import peak_rss_mb
    from ..training.batches import EVAL_SEED_OFFSET, eval_indices
    from ..training.config import as_config_error, int_list
    from ..training.distributed import close_distributed, init_distributed
    from ..training.evaluation import batch_bytes, check_memory, evaluate_by_length
    from ..training.experiment import format_table

    if args.task == LM_TASK:
        return evaluate_documents(args, started)
    try:
        with as_config_error():  # what the flags name, read before any evaluation: a damaged model is bad input
            model_dir = Path(args.model)
            segments = args.eval_segments  # the default is one string, given values a list
            segments = segments if isinstance(segments, str) else ",".join(segments)
            lengths = sorted(set(int_list("eval_segments", segments)))
            if not (model_dir / "tokenizer").is_dir():
                raise ConfigError(f"{model_dir} has no tokenizer/ directory: pass a run's export/ directory.")
            if args.eval_samples <= 0 or args.batch_size <= 0:
                raise ConfigError("--eval_samples and --batch_size must be positive.")
            model = RecurrentMemoryModel.from_pretrained(model_dir).eval()
            tokenizer = load_tokenizer(str(model_dir / "tokenizer"))
            generator = TaskGenerator(args.task, tokenizer, seed=args.data_seed + EVAL_SEED_OFFSET)
            dist_info = init_distributed()
            segment_size = model.config.segment_size
            batch = min(args.batch_size, len(eval_indices(args.eval_samples, 0, dist_info.world_size)))
            positions = segment_size + model.step.extra_positions(model.config)
            check_memory(
                f"--eval_segments {lengths[-1]} with --batch_size {batch}",
                batch_bytes(
                    batch,
                    lengths[-1] * segment_size,
                    4,
                    positions,
                    model.spec.hidden_size,
                    logits=segment_size * tokenizer.vocab_size if model.spec.kind == "decoder" else 0,
                ),
                dist_info.device,
                "lower --eval_segments or --batch_size",
            )
            model.to(dist_info.device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        close_distributed(wait_for_peers=False)
        return EXIT_CONFIG_ERROR
    classes = AnswerClasses(tokenizer) if model.spec.kind == "encoder" else None
    accuracy = evaluate_by_length(
        model,
        generator,
        lengths,
        segment_size=segment_size,
        samples=args.eval_samples,
        batch_size=args.batch_size,
        pad_id=tokenizer.pad_id,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        classes=classes,
    )
    if dist_info.rank == 0:
        peak_rss = peak_rss_mb()
        out = Path(args.out) if args.out else default_out(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        label = model.config.model_type if model.config.num_mem_tokens else "baseline"
        (out / "eval.json").write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "memory": label,
                    "task": args.task,
                    "segment_size": segment_size,
                    "accuracy": {str(k): v for k, v in accuracy.items()},
                    "eval_samples": args.eval_samples,
                    "peak_rss_mb": round(peak_rss),
                    "wall_time_s": round(time.perf_counter() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )
        print(format_table({label: accuracy}, segment_size, None), flush=True)
        print(f"peak RSS of this rank: {peak_rss:.0f} MB", flush=True)
    close_distributed(wait_for_peers=True)
    return 0


def evaluate_documents(args: argparse.Namespace, started: float) -> int:
    """--task lm: the report by segment of the model, its twin and full attention (``segment_report``)."""
    from ..data import LM_TASK, check_shard_task, check_shard_tokenizer, load_tokenizer
    from ..data.tars import check_shard_source
    from ..model import ConfigError, RecurrentMemoryModel, RMTConfig
    from ..training.config import as_config_error, int_list
    from ..training.distributed import close_distributed, init_distributed
    from ..training.evaluation import lm_eval_samples, segment_report
    from ..training.metrics import write_segment_report

    try:
        with as_config_error():
            model_dir = Path(args.model)
            segments = args.eval_segments if isinstance(args.eval_segments, str) else ",".join(args.eval_segments)
            max_segments = max(int_list("eval_segments", segments))
            if not args.shards:
                raise ConfigError(
                    f"--task {LM_TASK} evaluates on held-out documents: pass --shards, written by "
                    "tools/make_shards.py --task lm."
                )
            if args.eval_samples <= 0 or args.batch_size <= 0:
                raise ConfigError("--eval_samples and --batch_size must be positive.")
            twin_dir = Path(args.twin) if args.twin else default_twin(model_dir)
            if args.twin != TWIN_IS_BACKBONE and not twin_dir.is_dir():
                raise ConfigError(
                    f"no twin at {twin_dir}: pass --twin, the export of the no-memory twin (OUT/baseline/export of "
                    "a run with --baseline)."
                )
            if not (model_dir / "tokenizer").is_dir():
                raise ConfigError(f"{model_dir} has no tokenizer/ directory: pass a run's export/ directory.")
            tokenizer = load_tokenizer(str(model_dir / "tokenizer"))
            check_shard_source(args.shards)
            check_shard_tokenizer(args.shards, tokenizer, str(model_dir / "tokenizer"))
            check_shard_task(args.shards, LM_TASK)
            model = RecurrentMemoryModel.from_pretrained(model_dir).eval()
            if args.twin == TWIN_IS_BACKBONE:  # ARMT's layer hooks act only inside its own segment steps
                twin = RecurrentMemoryModel(
                    model.backbone, RMTConfig(num_mem_tokens=0, segment_size=model.config.segment_size)
                )
            else:
                twin = RecurrentMemoryModel.from_pretrained(twin_dir).eval()
            if twin.config.num_mem_tokens or twin.config.segment_size != model.config.segment_size:
                raise ConfigError(
                    f"--twin {twin_dir} is not a no-memory twin of {model_dir} (it has {twin.config.num_mem_tokens} "
                    f"memory tokens and {twin.config.segment_size}-token segments): pass the run's baseline/export."
                )
            samples = lm_eval_samples(args.shards, args.eval_samples, tokenizer.vocab_size)
            dist_info = init_distributed()
            model.to(dist_info.device)
            twin.to(dist_info.device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        close_distributed(wait_for_peers=False)
        return EXIT_CONFIG_ERROR
    report = segment_report(
        model,
        twin,
        samples,
        max_segments,
        batch_size=args.batch_size,
        pad_id=tokenizer.pad_id,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        device=dist_info.device,
    )
    if dist_info.rank == 0:
        out = Path(args.out) if args.out else default_out(model_dir)
        report = {"model": str(model_dir), "twin": str(twin_dir), "shards": args.shards, **report}
        report["wall_time_s"] = round(time.perf_counter() - started, 1)
        write_segment_report(report, out)
        width = max(len(name) for name in report["perplexity"])
        print(f"perplexity by segment ({report['samples']} samples of {args.shards}):")
        for name, values in report["perplexity"].items():
            print(f"  {name:<{width}}  " + " ".join(f"{v:8.2f}" for v in values))
        if report["beyond_reach"]:
            print(f"  full attention sees only the last {report['full_attention_reach']} tokens from segment "
                  f"{report['beyond_reach'][0]} on")  # fmt: skip
    close_distributed(wait_for_peers=True)
    return 0
