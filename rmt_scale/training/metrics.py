"""Rank 0's outputs: TensorBoard scalars (``OUT/tensorboard``), one JSON line per logged step
(``OUT/metrics.jsonl``) and the progress bar. Other ranks get a logger that does nothing. For an lm evaluation
by segment: its scalars (the segment index as the step) and its plot.

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


def write_segment_report(report: dict, out_dir: Path) -> None:
    """``results.json``, ``perplexity_by_segment.png`` and TensorBoard scalars ``segment/loss/NAME`` and
    ``segment/perplexity/NAME`` (step: the segment index) of an lm evaluation by segment (``segment_report``)."""
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    with SummaryWriter(str(out_dir / "tensorboard")) as writer:
        for measure in ("loss", "perplexity"):
            for name, values in report[measure].items():
                for k, value in zip(report["segments"], values):
                    writer.add_scalar(f"segment/{measure}/{name.replace(' ', '_')}", value, k)
    plot_by_segment(report, out_dir / "perplexity_by_segment.png")


def plot_by_segment(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, values in report["perplexity"].items():
        style = "--" if name == "twin" else ":" if name == "full attention" else "-"
        axis.plot(report["segments"], values, style, marker="o", label=name)
    if report["beyond_reach"]:
        first = report["beyond_reach"][0]
        axis.axvline(first - 0.5, color="grey", linewidth=0.8)
        axis.text(first - 0.4, axis.get_ylim()[1], "beyond full attention's reach", color="grey", fontsize=8, va="top")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_xlabel(f"segment index ({report['segment_size']} tokens each)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"next-token perplexity by segment ({report['samples']} held-out samples)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
