"""One training run from a config: the RMT, then (``--baseline``) its no-memory twin, then the table."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from ..data import LM_TASK
from ..runtime.allocator import current_allocator
from . import lock
from .config import TrainConfig
from .distributed import init_distributed
from .trainer import Trainer


def format_table(
    results: dict[str, dict[int, float]],
    segment_size: int,
    trained_segments: int | None,
    samples: dict[int, int] | None = None,
) -> str:
    """Markdown table of accuracy by length, one column per model, and with ``samples`` one saying how many
    samples each length was evaluated on; lengths past training are marked."""
    names = list(results)
    lengths = sorted({k for accuracy in results.values() for k in accuracy})
    header = f"| segments | tokens | {' | '.join(names)} |" + (" samples |" if samples else "")
    lines = [header, "|" + "---|" * (2 + len(names) + bool(samples))]
    for k in lengths:
        cells = " | ".join(f"{results[name].get(k, float('nan')):.3f}" for name in names)
        note = " (extrapolation)" if trained_segments is not None and k > trained_segments else ""
        count = f" {samples[k]} |" if samples else ""
        lines.append(f"| {k}{note} | {k * segment_size} | {cells} |{count}")
    return "\n".join(lines)


def run(config: TrainConfig) -> dict:
    """Trains (and evaluates) as configured; returns ``{"rmt": {segments: accuracy}, "baseline": ...}`` (``--task
    lm``: ``{segment: loss}``).
    Raises ``Preempted`` when a stop signal ended the run early, ``DataError`` when corrupt data did, ``Diverged``
    when the loss stayed non-finite (all after writing a checkpoint), and ``ConfigError``, before any work, for
    flags or paths that cannot work (``TrainConfig`` checks its values when it is built; the paths, the DeepSpeed
    config, the resume and the backbone are checked here, before a model is built)."""
    config.check_paths()
    dist_info = init_distributed(config.collective_timeout_s)
    started = time.perf_counter()
    results = {}
    # a frozen backbone's twin has nothing to train: it is the backbone (launchers/eval.py --twin backbone)
    train_twin = config.baseline and config.model.num_mem_tokens and not config.freeze_backbone
    runs = [config] + ([config.baseline_twin()] if train_twin else [])
    # one run per directory (the baseline's is inside it), held until results.json is written
    with lock.hold(Path(config.out_dir), dist_info.rank):
        for run_config in runs:
            trainer = Trainer(run_config, dist_info)
            results[trainer.label] = trainer.fit()
            del trainer  # free the engine (and its ZeRO-3 partitions) before the next one is built
            gc.collect()
        lm = config.task == LM_TASK
        trained = None if config.shards and not lm else max(config.curriculum_stages)
        if dist_info.rank == 0:
            by_length = {name: {str(k): v for k, v in scores.items()} for name, scores in results.items()}
            summary = {
                # --task lm: the evaluation's next-token loss of each segment, given the memory of those before
                ("loss_by_segment" if lm else "accuracy"): by_length,
                "segment_size": config.model.segment_size,
                "train_segments": trained,
                "eval_samples": {str(k): count for k, count in config.eval_samples_by_length.items()},
                "max_steps": config.max_steps,
                "world_size": dist_info.world_size,
                "wall_time_s": time.perf_counter() - started,
                "allocator": current_allocator(),
            }
            Path(config.out_dir, "results.json").write_text(json.dumps(summary, indent=2) + "\n")
            trained_on = f"shards {config.shards}" if config.shards else f"up to {trained} segments"
            if lm:
                print(f"\nnext-token loss of each segment on {config.eval_shards or 'no --eval_shards'}:")
                print(format_table(results, config.model.segment_size, trained), flush=True)
            else:
                print(
                    f"\nexact-answer accuracy by input length (trained on {trained_on}, "
                    f"{config.model.segment_size}-token segments):"
                )
                samples = config.eval_samples_by_length
                print(format_table(results, config.model.segment_size, trained, samples), flush=True)
    return results
