"""One training run from a config: the RMT, then (``--baseline``) its no-memory twin, then the table."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from .config import TrainConfig
from .distributed import init_distributed
from .trainer import Trainer


def format_table(results: dict[str, dict[int, float]], segment_size: int, trained_segments: int) -> str:
    names = list(results)
    lengths = sorted({k for accuracy in results.values() for k in accuracy})
    header = f"| segments | tokens | {' | '.join(names)} |"
    lines = [header, "|" + "---|" * (2 + len(names))]
    for k in lengths:
        cells = " | ".join(f"{results[name].get(k, float('nan')):.3f}" for name in names)
        note = " (extrapolation)" if k > trained_segments else ""
        lines.append(f"| {k}{note} | {k * segment_size} | {cells} |")
    return "\n".join(lines)


def run(config: TrainConfig) -> dict:
    """Trains (and evaluates) as configured; returns ``{"rmt": {segments: accuracy}, "baseline": ...}``.
    Raises ``Preempted`` when a stop signal ended the run early (a checkpoint was written)."""
    dist_info = init_distributed()
    started = time.perf_counter()
    results = {}
    runs = [config] + ([config.baseline_twin()] if config.baseline and config.num_mem_tokens else [])
    for run_config in runs:
        trainer = Trainer(run_config, dist_info)
        results[trainer.label] = trainer.fit()
        del trainer  # free the engine (and its ZeRO-3 partitions) before the next one is built
        gc.collect()
    if dist_info.rank == 0:
        summary = {
            "accuracy": {name: {str(k): v for k, v in accuracy.items()} for name, accuracy in results.items()},
            "segment_size": config.segment_size, "train_segments": max(config.curriculum_stages),
            "max_steps": config.max_steps, "world_size": dist_info.world_size,
            "wall_time_s": time.perf_counter() - started,
        }
        Path(config.out_dir, "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\nexact-answer accuracy by input length "
              f"(trained on up to {max(config.curriculum_stages)} segments of {config.segment_size} tokens):")
        print(format_table(results, config.segment_size, max(config.curriculum_stages)), flush=True)
    return results
