"""Rank 0's outputs: TensorBoard scalars (``OUT/tensorboard``), one JSON line per logged step
(``OUT/metrics.jsonl``) and the progress bar. Other ranks get a logger that does nothing.

DeepSpeed's own ``tensorboard`` block records only the learning rate and timings, so the scalars are
written here with torch's SummaryWriter.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, start_step: int, max_steps: int, label: str):
        self.enabled = enabled
        self.out_dir = out_dir
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after the checkpoint we resume from; metrics.jsonl likewise
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        purge_jsonl(out_dir / "metrics.jsonl", start_step)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=max_steps, initial=start_step, desc=label, dynamic_ncols=True, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        # JSON has no NaN or Infinity: a non-finite value (a diverged loss) is written as null
        finite = {tag: value if math.isfinite(value) else None for tag, value in values.items()}
        self.jsonl.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
        self.jsonl.flush()

    def progress(self, loss: float, accuracy: float | None, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        shown = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        if accuracy is not None:
            shown["acc"] = f"{accuracy:.2f}"
        self.bar.set_postfix(shown, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


def purge_jsonl(path: Path, start_step: int) -> None:
    """Drops the lines of steps after ``start_step``: a killed or failed run logged them past the checkpoint
    that this run starts from (all of them for a fresh run), and they are logged again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (step := _step(line)) is not None and step <= start_step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return None
