"""Turns analytic counts and measurements into slopes, a pass/fail verdict and files:
report.md (tables), report.json (everything), log-log PNG plots and optional TensorBoard scalars."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from rmt_scale.profiling import analytic
from rmt_scale.profiling.measure import FULL_ATTENTION_LABEL, Measurement
from rmt_scale.profiling.opt_configs import OPT_NAMES, opt_config

# Measured costs, with how each reads in tables and plots.
COSTS = {
    "train_flops": "training FLOPs",
    "forward_flops": "forward FLOPs",
    "train_seconds": "training step (s)",
    "forward_seconds": "forward (s)",
    "train_peak_mb": "training peak memory (MB)",
    "forward_peak_mb": "forward peak memory (MB)",
}
# Backprop modes built to hold training memory flat; bptt keeps every segment's activations by design.
FLAT_MEMORY_MODES = ("checkpoint", "replay")
# DeepSpeed's forward MACs x 2 against FlopCounterMode's forward FLOPs: both count the same matmuls and SDPA
# (equal to the FLOP on the measured backbones); a larger gap means one of them misses an operation.
COUNTER_TOLERANCE = 0.01
# The analytic sweep: 512 to 2,097,152 tokens by doubling, plus the paper's 2,048,000, for RMT with
# the library's default segments (512 tokens, read and write memory of 16 tokens each).
ANALYTIC_LENGTHS = sorted({512 * 2**k for k in range(13)} | {analytic.PAPER_LENGTH})
ANALYTIC_SEGMENT_SIZE = 512
ANALYTIC_MEM_TOKENS = 16


def loglog_slope(lengths, values) -> float:
    """Least-squares slope of log(value) against log(length): 1 is linear, 2 quadratic."""
    lengths, values = np.asarray(lengths, dtype=float), np.asarray(values, dtype=float)
    if len(set(lengths.tolist())) < 2:
        raise ValueError("a slope needs at least two different lengths")
    if (lengths <= 0).any() or (values <= 0).any():
        raise ValueError("log-log slopes need positive lengths and values")
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def _by_variant(measurements: list[Measurement]) -> dict[str, list[Measurement]]:
    runs: dict[str, list[Measurement]] = {}
    for m in measurements:
        if m.ok:
            runs.setdefault(m.variant, []).append(m)
    return runs


def measured_slopes(measurements: list[Measurement]) -> dict[str, dict[str, float]]:
    """Slope of every cost of every variant over the lengths where it ran; NaN where none can be fit."""
    slopes = {}
    for variant, runs in _by_variant(measurements).items():
        slopes[variant] = {}
        for cost in COSTS:
            try:
                slopes[variant][cost] = loglog_slope([m.length for m in runs], [getattr(m, cost) for m in runs])
            except ValueError:
                slopes[variant][cost] = math.nan
    return slopes


@dataclass
class Verdict:
    rmt_flop_slope: float  # the steepest FLOP slope of any RMT variant, training or forward
    full_flop_slope: float  # full attention's training FLOP slope
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(slopes: dict[str, dict[str, float]], flop_slope_limit: float, memory_slope_limit: float) -> Verdict:
    """RMT passes when its FLOPs grow at most linearly and its peak memory does not grow with length:
    the forward pass in every mode, training in the modes built for flat memory."""
    rmt = {variant: s for variant, s in slopes.items() if variant != FULL_ATTENTION_LABEL}
    full_slope = slopes.get(FULL_ATTENTION_LABEL, {}).get("train_flops", math.nan)
    if not rmt:
        return Verdict(math.nan, full_slope, ["no RMT variant ran at two or more lengths"])
    flop_slopes = [s[cost] for s in rmt.values() for cost in ("train_flops", "forward_flops")]
    verdict = Verdict(max(flop_slopes), full_slope)
    if not verdict.rmt_flop_slope <= flop_slope_limit:  # also catches NaN
        verdict.failures.append(f"RMT FLOP slope {verdict.rmt_flop_slope:.3f} exceeds {flop_slope_limit}")
    for variant, s in rmt.items():
        gated = ["forward_peak_mb"] + (["train_peak_mb"] if variant.endswith(FLAT_MEMORY_MODES) else [])
        for cost in gated:
            if not s[cost] <= memory_slope_limit:
                verdict.failures.append(
                    f"{variant} {COSTS[cost]} grows with length (slope {s[cost]:.3f} > {memory_slope_limit})"
                )
    return verdict


def counter_agreement(measurements: list[Measurement]) -> list[dict]:
    """FlopCounterMode against DeepSpeed's FlopsProfiler on the same forward pass, per measurement."""
    rows = []
    for m in measurements:
        if m.ok and m.forward_flops and m.deepspeed_forward_macs:
            rows.append(
                dict(
                    variant=m.variant,
                    length=m.length,
                    flopcounter=m.forward_flops,
                    deepspeed_macs_x2=2 * m.deepspeed_forward_macs,
                    deepspeed_flops=m.deepspeed_forward_flops,
                    matmul_ratio=2 * m.deepspeed_forward_macs / m.forward_flops,
                    flops_ratio=m.deepspeed_forward_flops / m.forward_flops,
                    train_over_forward=m.train_flops / m.deepspeed_forward_flops,
                )
            )
    return rows


def counter_failures(rows: list[dict], tolerance: float = COUNTER_TOLERANCE) -> list[str]:
    return [
        f"{r['variant']} @ {r['length']}: DeepSpeed's forward MACs x 2 are {r['matmul_ratio']:.4f} x "
        f"FlopCounterMode's FLOPs (tolerance {tolerance})"
        for r in rows
        if abs(r["matmul_ratio"] - 1) > tolerance
    ]


# ---------------------------------------------------------------------------------------- analytic
def paper_reproduction() -> list[dict]:
    """RMT's FLOP savings at the paper's 2,048,000 tokens for every convention and segment layout."""
    rows = []
    for convention in analytic.CONVENTIONS:
        for layout in analytic.PAPER_LAYOUTS:
            ratios = {
                name: analytic.flop_savings(opt_config(name), analytic.PAPER_LENGTH, layout, convention)
                for name in OPT_NAMES
            }
            errors = {name: ratios[name] / claim - 1 for name, claim in analytic.PAPER_CLAIM.items()}
            rows.append(dict(convention=convention, layout=layout.name, ratios=ratios, relative_error=errors))
    return rows


def best_match(rows: list[dict]) -> dict:
    """The row whose worst relative error against the two claimed ratios is smallest."""
    return min(rows, key=lambda row: max(abs(e) for e in row["relative_error"].values()))


def analytic_sweep(
    segment_size: int = ANALYTIC_SEGMENT_SIZE, num_mem_tokens: int = ANALYTIC_MEM_TOKENS, convention: str = "chinchilla"
) -> dict:
    """Forward and training FLOPs of full attention and RMT (decoder layout: 2 x memory per segment)
    for every OPT size over ANALYTIC_LENGTHS."""
    sweep = {}
    for name in OPT_NAMES:
        config = opt_config(name)
        full = [analytic.full_attention_flops(config, n, convention) for n in ANALYTIC_LENGTHS]
        rmt = [analytic.rmt_flops(config, n, segment_size, 2 * num_mem_tokens, convention) for n in ANALYTIC_LENGTHS]
        sweep[name] = {
            "full_forward": full,
            "rmt_forward": rmt,
            "full_train": [analytic.training_flops(f, "full") for f in full],
            **{
                f"rmt_{mode}_train": [analytic.training_flops(f, mode) for f in rmt]
                for mode in ("bptt", "checkpoint", "replay")
            },
            "full_slope": loglog_slope(ANALYTIC_LENGTHS, full),
            "rmt_slope": loglog_slope(ANALYTIC_LENGTHS, rmt),
        }
    return sweep


# ---------------------------------------------------------------------------------------- writers
def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else _fmt(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _column_table(columns: dict, items) -> list[str]:
    """A table whose columns are {header: value of an item}; each item is the arguments of every column."""
    return _table(list(columns), [[value(*item) for value in columns.values()] for item in items])


def markdown(report: dict) -> str:
    settings, verdict = report["settings"], report["verdict"]
    lines = ["# RMT vs full attention: FLOP, time and memory scaling", ""]

    lines += [f"## Paper claim at {analytic.PAPER_LENGTH:,} tokens (analytic forward FLOPs, full / RMT)", ""]
    names = list(OPT_NAMES)
    lines += _table(
        ["convention", "segment layout", *names],
        [[r["convention"], r["layout"], *(r["ratios"][n] for n in names)] for r in report["paper"]],
    )
    best = report["paper_best_match"]
    errors = ", ".join(
        f"{n}: {best['ratios'][n]:.1f}x vs {c:g}x ({100 * best['relative_error'][n]:+.1f}%)"
        for n, c in analytic.PAPER_CLAIM.items()
    )
    lines += [f"Closest: **{best['convention']}**, {best['layout']} — {errors}.", ""]

    at = ANALYTIC_LENGTHS.index(analytic.PAPER_LENGTH)
    lines += [
        f"## Analytic FLOPs at {analytic.PAPER_LENGTH:,} tokens (chinchilla convention, "
        f"{ANALYTIC_SEGMENT_SIZE}-token segments + 2x{ANALYTIC_MEM_TOKENS} memory)",
        "",
    ]
    sweep_columns = {
        "backbone": lambda n, s: n,
        "full fwd": lambda n, s: s["full_forward"][at],
        "RMT fwd": lambda n, s: s["rmt_forward"][at],
        "full train": lambda n, s: s["full_train"][at],
        "RMT train (bptt)": lambda n, s: s["rmt_bptt_train"][at],
        "RMT train (replay)": lambda n, s: s["rmt_replay_train"][at],
        "full slope": lambda n, s: s["full_slope"],
        "RMT slope": lambda n, s: s["rmt_slope"],
    }
    lines += _column_table(sweep_columns, report["analytic_sweep"].items())

    lines += [
        f"## Measured on `{settings['backbone']}` (segment {settings['segment_size']}, "
        f"{settings['num_mem_tokens']} memory tokens, threads: {settings['threads']})",
        "",
    ]
    measured_columns = {
        "variant": lambda m: m["variant"],
        "length": lambda m: str(m["length"]),
        "train FLOPs": lambda m: m["error"] or m["train_flops"],
        "fwd FLOPs": lambda m: "" if m["error"] else m["forward_flops"],
        "train s": lambda m: m["train_seconds"],
        "train tok/s": lambda m: m["length"] / m["train_seconds"] if m["train_seconds"] else math.nan,
        "fwd s": lambda m: m["forward_seconds"],
        "train peak MB": lambda m: m["train_peak_mb"],
        "fwd peak MB": lambda m: m["forward_peak_mb"],
    }
    lines += _column_table(measured_columns, ((m,) for m in report["measurements"]))
    lines += ["### Log-log slopes against length", ""]
    lines += _table(
        ["variant", *COSTS.values()], [[variant, *(s[c] for c in COSTS)] for variant, s in report["slopes"].items()]
    )
    lines += [
        "### FlopCounterMode vs DeepSpeed's FlopsProfiler (the same forward pass)",
        "",
        "DeepSpeed counts a matmul as 2 x MACs and adds LayerNorms, activations, softmax and additions; "
        "FlopCounterMode counts matmuls and SDPA only. DeepSpeed counts the forward pass only and takes a "
        "training step as 3 x forward (4 x with `recompute_fwd_factor` 1); the last column is what "
        "FlopCounterMode counted for the training step. See docs/profiling.md.",
        "",
    ]
    agreement_columns = {
        "variant": lambda r: r["variant"],
        "length": lambda r: str(r["length"]),
        "FlopCounterMode fwd": lambda r: r["flopcounter"],
        "DeepSpeed 2 x MACs": lambda r: r["deepspeed_macs_x2"],
        "DeepSpeed flops": lambda r: r["deepspeed_flops"],
        "2 x MACs / FCM": lambda r: f"{r['matmul_ratio']:.4f}",
        "flops / FCM": lambda r: f"{r['flops_ratio']:.4f}",
        "FCM train / DeepSpeed fwd": lambda r: r["train_over_forward"],
    }
    lines += _column_table(agreement_columns, ((r,) for r in report["counter_agreement"]))
    lines += [
        f"RMT FLOP slope: {verdict['rmt_flop_slope']:.3f} (limit {settings['flop_slope_limit']}), "
        f"full attention FLOP slope: {verdict['full_flop_slope']:.3f}. "
        + ("**PASS**" if not verdict["failures"] else "**FAIL**: " + "; ".join(verdict["failures"])),
        "",
    ]
    return "\n".join(lines)


def _loglog_axes(title: str, ylabel: str):
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.set(xscale="log", yscale="log", xlabel="input length (tokens)", ylabel=ylabel, title=title)
    axes.grid(True, which="both", alpha=0.3)
    return figure, axes


def _save(figure, path: Path) -> None:
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plots(report: dict, out: Path) -> list[Path]:
    """flops.png, time.png and memory.png (measured) and analytic_flops.png; all log-log."""
    runs = _by_variant([Measurement(**m) for m in report["measurements"]])
    panels = {
        "flops.png": ("Measured FLOPs per step", "FLOPs", ("train_flops", "forward_flops")),
        "time.png": ("Measured wall time", "seconds", ("train_seconds", "forward_seconds")),
        "memory.png": ("Measured peak memory above the model", "MB", ("train_peak_mb", "forward_peak_mb")),
    }
    paths = []
    for filename, (title, ylabel, costs) in panels.items():
        figure, axes = _loglog_axes(title, ylabel)
        for index, (variant, ms) in enumerate(runs.items()):
            # one colour per variant: training solid, forward dashed
            for cost, style in zip(costs, ("-o", "--x")):
                axes.plot(
                    [m.length for m in ms],
                    [max(getattr(m, cost), 1e-9) for m in ms],
                    style,
                    color=f"C{index}",
                    label=f"{variant}, {COSTS[cost].split(' ')[0]}",
                )
        _save(figure, out / filename)
        paths.append(out / filename)

    figure, axes = _loglog_axes("Analytic forward FLOPs (chinchilla convention)", "FLOPs")
    for index, (name, s) in enumerate(report["analytic_sweep"].items()):
        color = f"C{index}"
        axes.plot(ANALYTIC_LENGTHS, s["full_forward"], "--", color=color, label=f"{name} full")
        axes.plot(ANALYTIC_LENGTHS, s["rmt_forward"], "-", color=color, label=f"{name} RMT")
    _save(figure, out / "analytic_flops.png")
    return paths + [out / "analytic_flops.png"]


def tensorboard(report: dict, logdir: Path) -> None:
    """One scalar series per variant and cost, with the input length as the step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for m in report["measurements"]:
            if not m["error"]:
                for cost in COSTS:
                    writer.add_scalar(f"{m['variant']}/{cost}", m[cost], global_step=m["length"])


def write(report: dict, out: Path, with_tensorboard: bool = False) -> list[Path]:
    """Writes every output file into `out` and returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(markdown(report))
    paths = [out / "report.json", out / "report.md", *plots(report, out)]
    if with_tensorboard:
        tensorboard(report, out / "tensorboard")
        paths.append(out / "tensorboard")
    return paths


def build(settings: dict, measurements: list[Measurement]) -> dict:
    """Everything the writers need, as plain JSON-able data."""
    slopes = measured_slopes(measurements)
    verdict = judge(slopes, settings["flop_slope_limit"], settings["memory_slope_limit"])
    agreement = counter_agreement(measurements)
    verdict.failures += counter_failures(agreement)
    paper = paper_reproduction()
    return {
        "settings": settings,
        "conventions": analytic.__doc__,
        "paper": paper,
        "paper_best_match": best_match(paper),
        "analytic_lengths": ANALYTIC_LENGTHS,
        "analytic_sweep": analytic_sweep(),
        "measurements": [m.as_dict() for m in measurements],
        "slopes": slopes,
        "counter_agreement": agreement,
        "verdict": {**asdict(verdict), "passed": verdict.passed},
    }
