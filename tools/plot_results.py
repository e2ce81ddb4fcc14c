#!/usr/bin/env python
"""Accuracy by input length of finished runs: a table (markdown), JSON, and a PNG with tokens on a log axis.

    python tools/plot_results.py runs/results/armt runs/results/rmt runs/results/armt-delta --out docs/results
    python tools/plot_results.py runs/results/detect-armt --out docs/results      # -> detect_by_length.png
    python tools/plot_results.py runs/results/armt runs/eval-1M --out docs/results  # with launchers/eval.py's
    python tools/plot_results.py docs/results/memorize_by_length.json runs/eval-10M --out docs/results

Each argument is a run's output directory (its results.json, written by launchers/train.py): every model in
it (the memory model and its no-memory twin) becomes a curve, labelled by the directory's name. An argument
may also be the --out directory of launchers/eval.py (its eval.json): its lengths become points drawn as
stars, for the long evaluations with more samples than a training run's own. An argument may also be a
TASK_by_length.json this tool wrote: its curves are kept, so that a new evaluation joins a plot whose runs
are gone. All of them must be of one task. Exit codes: 0 done; 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class InputError(Exception):
    """An argument this tool cannot plot: printed as one line, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs",
        nargs="+",
        help="run output directories holding results.json, launchers/eval.py's holding eval.json, "
        "or a TASK_by_length.json written by this tool",
    )
    parser.add_argument("--out", default=".", help="directory for the outputs, TASK_by_length.{png,json} (default: .)")
    parser.add_argument("--name", default="", help="file name stem of the outputs (default: TASK_by_length)")
    return parser.parse_args(argv)


def load(runs: list[str]) -> list[dict]:
    curves = []
    for run in runs:
        if run.endswith(".json") and Path(run).is_file():
            # "evaluation" is missing from the curves of older versions of this tool, which drew runs only
            curves.extend({"evaluation": False, **curve} for curve in json.loads(Path(run).read_text()))
            continue
        if (Path(run) / "eval.json").is_file():
            curves.append(load_evaluation(Path(run)))
            continue
        path = Path(run) / "results.json"
        if not path.is_file():
            raise InputError(
                f"{path} is missing: pass the --out_dir of a finished launchers/train.py run or of launchers/eval.py."
            )
        results = json.loads(path.read_text())
        if "loss_by_segment" in results:
            raise InputError(
                f"{run} is a --task lm run (loss by segment, not accuracy by length): launchers/eval.py --task lm "
                "plots it."
            )
        task = json.loads((Path(run) / "train_config.json").read_text())["task"]
        samples = results.get("eval_samples", {})
        for model, accuracy in results["accuracy"].items():
            points = sorted((int(k) * results["segment_size"], v, samples.get(k)) for k, v in accuracy.items())
            curves.append(
                {
                    "run": Path(run).name,
                    "task": task,
                    "model": model,
                    "points": points,
                    "train_tokens": (results["train_segments"] or 0) * results["segment_size"],
                    "evaluation": False,
                }
            )
    tasks = {}
    for curve in curves:
        tasks.setdefault(curve["task"], []).append(curve["run"])
    if len(tasks) > 1:
        listed = "; ".join(f"{task}: {', '.join(dict.fromkeys(runs))}" for task, runs in tasks.items())
        raise InputError(f"the runs are of different tasks ({listed}): plot one task at a time.")
    return curves


def load_evaluation(run: Path) -> dict:
    evaluation = json.loads((run / "eval.json").read_text())
    # "memory" and "eval_samples" are missing from the eval.json of older versions of launchers/eval.py
    points = sorted(
        (int(k) * evaluation["segment_size"], v, evaluation.get("eval_samples"))
        for k, v in evaluation["accuracy"].items()
    )
    # train_tokens 0: an evaluation does not say how long its model's training inputs were
    return {
        "run": run.name,
        "task": evaluation["task"],
        "model": evaluation.get("memory", "eval"),
        "points": points,
        "train_tokens": 0,
        "evaluation": True,
    }


def table(curves: list[dict]) -> str:
    lines = ["| run | model | tokens | accuracy | samples |", "|---|---|---|---|---|"]
    for curve in curves:
        for tokens, accuracy, samples in curve["points"]:
            lines.append(f"| {curve['run']} | {curve['model']} | {tokens:,} | {accuracy:.3f} | {samples or ''} |")
    return "\n".join(lines)


TITLES = {
    "memorize": "memorize: a fact at the start, the question at the end",
    "detect": "detect: a fact anywhere, the question at the end",
    "reason": "reason: two supporting facts anywhere, the question at the end",
}


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for curve in curves:
        tokens, accuracy, _ = zip(*curve["points"])
        style = "--" if curve["model"] == "baseline" else "-"
        marker = {"marker": "*", "markersize": 12} if curve["evaluation"] else {"marker": "o"}
        axis.plot(tokens, accuracy, style, **marker, label=f"{curve['run']}: {curve['model']}")
    longest_training = max(curve["train_tokens"] for curve in curves)
    if longest_training:
        axis.axvline(longest_training, color="grey", linewidth=0.8)
        axis.text(longest_training * 1.1, 0.55, "longest training input", color="grey", fontsize=8)
    axis.axhline(1 / 6, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xscale("log")
    axis.text(axis.get_xlim()[1] / 1.3, 1 / 6 + 0.02, "chance (1/6)", color="grey", fontsize=8, ha="right")
    axis.set_ylim(-0.02, 1.05)
    axis.set_xlabel("input length, tokens (log scale)")
    axis.set_ylabel("exact-answer accuracy")
    axis.set_title(TITLES[curves[0]["task"]])
    axis.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        curves = load(args.runs)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{curves[0]['task']}_by_length"
    (out / f"{name}.json").write_text(json.dumps(curves, indent=2) + "\n")
    plot(curves, out / f"{name}.png")
    print(json.dumps(curves))
    print(table(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
