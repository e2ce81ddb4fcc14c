"""Real runs of launchers/train.py for the end-to-end tests: a short run's flags and environment, the launch on 1
or 2 ranks, and what the run wrote (losses, TensorBoard scalars, the export's accuracy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rmt_scale import RecurrentMemoryModel
from rmt_scale.data import AnswerClasses, TaskGenerator, load_tokenizer
from rmt_scale.training.batches import EVAL_SEED_OFFSET
from rmt_scale.training.distributed import free_port
from rmt_scale.training.evaluation import stacked_batch, streaming_correct

from . import ROOT

LAUNCHER = str(ROOT / "launchers" / "train.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SEGMENT = 16
# largest loss difference over all steps against 1 rank x batch 4: measured 4.8e-7 (one float32 ulp at the
# loss values) for 2 ranks and for ZeRO-3; the bound leaves room for other CPUs' rounding
LOSS_TOLERANCE = 1e-5


def run_args(backbone: Path, out: Path, **flags) -> list[str]:
    settings = dict(
        backbone=backbone,
        tokenizer="builtin",
        memory="rmt",
        segment_size=SEGMENT,
        num_mem_tokens=4,
        micro_batch_size=2,
        curriculum="1,2",
        eval_segments="1,2,4",
        eval_samples=8,
        eval_every=2,
        max_steps=4,
        save_every=0,
        lr=3e-3,
        warmup_steps=1,
        out_dir=out,
    )
    settings.update(flags)
    args = []
    for name, value in settings.items():
        args += [f"--{name}", str(value)] if value is not True else [f"--{name}"]
    return args + ["--no-baseline"]


def environment(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, **extra}


def launch(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    """``python launchers/train.py`` for 1 rank, ``deepspeed --num_gpus 2 launchers/train.py`` for 2."""
    if ranks == 1:
        command = [sys.executable, LAUNCHER, *args]
    else:
        command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), LAUNCHER, *args]
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def refused_in_one_line(cases: dict[str, list[str]]) -> None:
    """Runs every ``{message: command}`` at once (to keep the tests short); each must exit 2, print nothing on
    stdout and one line on stderr, ``error: <message>...``, transformers' bar as it reads a backbone aside."""
    processes = {
        message: subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for message, command in cases.items()
    }
    for message, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (message, stderr[-3000:])
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (message, stderr)
        assert stdout == "", (message, stdout)


def losses(out: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; after a resume the re-run steps' later lines win."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            found[record["step"]] = record["train/loss"]
    return found


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def exported_accuracy(export: Path, segments: int, classes: bool = False) -> float:
    """Streaming accuracy of an export on the run's own evaluation samples at one length."""
    model = RecurrentMemoryModel.from_pretrained(export).eval()
    tokenizer = load_tokenizer(str(export / "tokenizer"))
    generator = TaskGenerator("memorize", tokenizer, seed=EVAL_SEED_OFFSET)
    input_ids, labels = stacked_batch(
        generator,
        range(8),
        segments * SEGMENT,
        SEGMENT,
        tokenizer.pad_id,
        AnswerClasses(tokenizer) if classes else None,
    )
    return streaming_correct(model, input_ids, labels, SEGMENT).float().mean().item()
