"""Measured cost of one training step and one forward pass: FLOPs, wall time and peak memory. The
profiler (tools/profile_flops.py) and the memory benchmark (tools/bench_memory.py) both measure here.

Each (variant, length) runs in its own process, forked from a server that has already imported
torch and transformers, so that the peak-memory high-water mark (`VmHWM`, which a forked child
starts at its own size) belongs to that configuration alone and a crash or an out-of-memory kill ends
only that measurement.

Peak memory is the high-water mark after the step minus the resident set size just before it: the extra
memory the step needed (activations, saved tensors, gradients), not the weights. The measuring
processes use the allocator of `rmt_scale.runtime.allocator` (jemalloc when installed, else glibc with a 128 KiB
mmap threshold); otherwise the heap glibc keeps after freeing reads as growth (RMT in checkpoint mode
seemed to grow 220 -> 491 MB from 4 to 32 segments; with the threshold: 143 -> 151 MB).
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls and SDPA, forward and
backward); DeepSpeed's `FlopsProfiler` counts the same forward pass as a cross-check (it patches
`torch.nn.functional` and tensor methods, and counts elementwise operations too). Wall time is the
fastest of at least `repeats` runs lasting at least `min_seconds` together, after one warm-up run (which counts
itself when it lasts `TIMED_WARMUP_SECONDS`), because other processes on a small CPU box only ever make a run
slower; the training step's CPU time is kept too. Weights are random: cost does not depend on them.
"""

import math
import multiprocessing
import multiprocessing.forkserver
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import psutil
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from rmt_scale.model import ARMTConfig, RecurrentMemoryModel, RMTConfig
from rmt_scale.model.presets import BACKBONE_PRESETS, preset_config
from rmt_scale.profiling.opt_configs import OPT_NAMES, opt_config
from rmt_scale.runtime.allocator import allocator_env
from rmt_scale.runtime.device import select_accelerator
from rmt_scale.runtime.memory import peak_rss_mb

FULL_ATTENTION = "full"
FULL_ATTENTION_LABEL = "full attention"
RMT_MODES = ("bptt", "checkpoint", "replay")
MEMORY_KINDS = ("rmt", "armt")


@dataclass(frozen=True)
class Variant:
    """What to measure: the plain backbone ("full") or a memory wrapper (RMT or ARMT) in one backprop mode."""

    name: str  # "full", or one of MEMORY_KINDS
    mode: str  # "full" for the plain backbone, else one of RMT_MODES
    segment_size: int = 512
    num_mem_tokens: int = 16

    @property
    def label(self) -> str:
        return FULL_ATTENTION_LABEL if self.name == FULL_ATTENTION else f"{self.name}-{self.mode}"


@dataclass(frozen=True)
class Measurement:
    variant: str
    length: int
    train_flops: int
    forward_flops: int
    train_seconds: float
    forward_seconds: float
    train_peak_mb: float
    forward_peak_mb: float
    rss_before_mb: float = 0.0  # resident memory before the first pass (runtime and weights), for absolute peaks
    # CPU seconds of the fastest training step, all threads of the process: with one thread, the time it held a
    # core, which other processes sharing the machine inflate much less than the wall time
    train_cpu_seconds: float = 0.0
    deepspeed_forward_flops: int = 0  # DeepSpeed's FlopsProfiler: matmuls as 2 x MACs, plus elementwise ops
    deepspeed_forward_macs: int = 0
    error: str = ""  # set when the run failed (e.g. out of memory); the numbers are then 0

    @classmethod
    def failed(cls, variant: Variant, length: int, error: str) -> "Measurement":
        return cls(variant.label, length, 0, 0, 0.0, 0.0, 0.0, 0.0, error=error)

    @property
    def ok(self) -> bool:
        return not self.error

    def as_dict(self) -> dict:
        return asdict(self)


def backbone_config(backbone: str, max_positions: int) -> transformers.PretrainedConfig:
    """Config for a tiny backbone's name, a published OPT size, or a local Hugging Face model directory;
    positions are widened to `max_positions` so that one forward pass can see its whole input."""
    if backbone in BACKBONE_PRESETS:
        config = preset_config(backbone)
    elif backbone.lower().removeprefix("facebook/") in OPT_NAMES:
        config = opt_config(backbone)
    elif os.path.isdir(backbone):
        config = transformers.AutoConfig.from_pretrained(backbone)
    else:
        raise ValueError(
            f"unknown backbone {backbone!r}: expected a tiny backbone ({', '.join(BACKBONE_PRESETS)}), an OPT size "
            f"({', '.join(OPT_NAMES)}) or a local Hugging Face model directory"
        )
    if getattr(config, "max_position_embeddings", max_positions) < max_positions:
        config.max_position_embeddings = max_positions
    return config


def _build_model(variant: Variant, config) -> torch.nn.Module:
    backbone = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if variant.name == FULL_ATTENTION:
        return backbone
    config_class = ARMTConfig if variant.name == "armt" else RMTConfig
    memory_config = config_class(
        num_mem_tokens=variant.num_mem_tokens, segment_size=variant.segment_size, bptt_depth=-1, backprop=variant.mode
    )
    return RecurrentMemoryModel(backbone, memory_config)


def _peak_mb_since(rss_before: int) -> float:
    return max(0.0, peak_rss_mb() - rss_before / 2**20)


def _positions(variant: Variant, length: int) -> int:
    """Positions one forward pass sees. Only full attention needs the whole input: a bigger table would
    inflate the memory wrappers' weights."""
    return length if variant.name == FULL_ATTENTION else variant.segment_size + 2 * variant.num_mem_tokens


def _train_step(model, input_ids) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=input_ids).loss.backward()


def _forward(model, input_ids) -> None:
    # With labels, so that both the plain backbone and RMT run the LM head over every token.
    with torch.no_grad():
        model(input_ids, labels=input_ids)


# A first run this long is timed rather than thrown away as a warm-up: its one-off setup (well under a
# second) is lost in it, and a 1M-token training step would otherwise take twice its minutes.
TIMED_WARMUP_SECONDS = 30.0


def _fastest_of(repeats: int, min_seconds: float, fn, *args) -> tuple[float, float]:
    """Wall and CPU seconds of the fastest run."""

    def timed() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn(*args)
        return time.perf_counter() - wall, time.process_time() - cpu

    first = timed()  # warm-up: pays one-off allocation and kernel setup
    times = [first] if first[0] >= TIMED_WARMUP_SECONDS else []
    while len(times) < repeats or sum(wall for wall, _ in times) < min_seconds:
        times.append(timed())
    return min(times)


# torch's FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel that SDPA picks
# on CPU, so attention would count as zero here. Count it with torch's own SDPA formulas.
def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def counted_flops(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` as FlopCounterMode sees them, the CPU SDPA kernel included."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def deepspeed_counts(fn, model, *args) -> tuple[int, int]:
    """``(FLOPs, MACs)`` of ``fn(model, *args)`` as DeepSpeed's FlopsProfiler counts them: what its engine's
    ``flops_profiler`` block reports for a forward call."""
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    profiler = FlopsProfiler(model)
    profiler.start_profile()
    try:
        fn(model, *args)
        return profiler.get_total_flops(), profiler.get_total_macs()
    finally:
        profiler.end_profile()


def _measure_in_this_process(
    variant: Variant,
    length: int,
    forward: bool,
    train: bool,
    backbone: str,
    threads: int,
    repeats: int,
    min_seconds: float,
    count_flops: bool,
) -> Measurement:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = backbone_config(backbone, _positions(variant, length))
    model = _build_model(variant, config)
    model.train()
    input_ids = torch.randint(config.vocab_size, (1, length))

    rss_before = psutil.Process().memory_info().rss
    # The forward pass runs first so that its peak is read before training raises the high-water mark.
    forward_seconds, _ = _fastest_of(repeats, min_seconds, _forward, model, input_ids) if forward else (0.0, 0.0)
    forward_peak = _peak_mb_since(rss_before) if forward else 0.0
    train_seconds, train_cpu_seconds = (
        _fastest_of(repeats, min_seconds, _train_step, model, input_ids) if train else (0.0, 0.0)
    )
    train_peak = _peak_mb_since(rss_before) if train else 0.0
    deepspeed_flops, deepspeed_macs = deepspeed_counts(_forward, model, input_ids) if count_flops else (0, 0)
    return Measurement(
        variant=variant.label,
        length=length,
        train_flops=counted_flops(_train_step, model, input_ids) if train and count_flops else 0,
        forward_flops=counted_flops(_forward, model, input_ids) if forward and count_flops else 0,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        forward_seconds=forward_seconds,
        train_peak_mb=train_peak,
        forward_peak_mb=forward_peak,
        rss_before_mb=rss_before / 2**20,
        deepspeed_forward_flops=deepspeed_flops,
        deepspeed_forward_macs=deepspeed_macs,
    )


class Measurer:
    """Runs each measurement in a fresh process forked from a server with torch already imported.

    The allocator is chosen when a process starts: the fork server, started here, and its children get
    `allocator` (see rmt_scale.runtime.allocator), so the peak tracks live tensors rather than heap fragmentation.
    There is one fork server per process, so every Measurer of a process must use the same allocator.
    """

    def __init__(
        self,
        backbone: str,
        threads: int | None = None,
        repeats: int = 2,
        min_seconds: float = 0.0,
        allocator: str = "auto",
        count_flops: bool = True,
    ):
        if repeats <= 0:
            raise ValueError(f"repeats must be positive, got {repeats}")
        backbone_config(backbone, 0)  # fail fast on a bad backbone, in this process
        self.backbone = backbone
        self.repeats = repeats
        self.min_seconds = min_seconds
        self.count_flops = count_flops
        self.threads = threads or torch.get_num_threads()
        self._context, self.allocator = _fork_server(allocator)

    def measure(self, variant: Variant, length: int, forward: bool = True, train: bool = True) -> Measurement:
        """A forward pass and a training step at `length` tokens; `forward=False` or `train=False` skips one."""
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if not (forward or train):
            raise ValueError("nothing to measure: pass forward=True, train=True or both")
        with ProcessPoolExecutor(max_workers=1, mp_context=self._context) as pool:
            future = pool.submit(
                _measure_in_this_process,
                variant,
                length,
                forward,
                train,
                self.backbone,
                self.threads,
                self.repeats,
                self.min_seconds,
                self.count_flops,
            )
            try:
                return future.result()
            except Exception as error:  # an OOM kill surfaces as BrokenProcessPool
                return Measurement.failed(variant, length, f"{type(error).__name__}: {error}")


_fork_server_allocator: dict[str, str] = {}  # the choice the fork server was started with -> the allocator it got


def _fork_server(choice: str) -> tuple[multiprocessing.context.BaseContext, str]:
    """The forkserver context, its server started with allocator `choice` (this process keeps its own
    environment), and the allocator the server really got."""
    context = multiprocessing.get_context("forkserver")
    if not _fork_server_allocator:
        environment, allocator = allocator_env(choice)
        # "__main__" too, so that no child re-imports the calling script (and matplotlib with it).
        context.set_forkserver_preload(
            ["__main__", "torch", "transformers", "rmt_scale.profiling.measure", "deepspeed.profiling.flops_profiler"]
        )
        saved = dict(os.environ)
        os.environ.update(environment)
        select_accelerator()  # DeepSpeed, imported by the server, must not look for a GPU that is not there
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _fork_server_allocator[choice] = allocator
    if choice not in _fork_server_allocator:
        raise RuntimeError(
            f"allocator {choice!r} asked for, but this process's fork server already runs with "
            f"{next(iter(_fork_server_allocator))!r}: measure with one allocator per process."
        )
    return context, _fork_server_allocator[choice]


def _predicted_peak_mb(done: list[Measurement], length: int) -> float:
    """Extrapolates training peak memory to `length` along the log-log line through the last two runs."""
    if len(done) < 2:
        return 0.0
    a, b = done[-2], done[-1]
    if min(a.train_peak_mb, b.train_peak_mb) <= 0:
        return b.train_peak_mb
    slope = math.log(b.train_peak_mb / a.train_peak_mb) / math.log(b.length / a.length)
    return b.train_peak_mb * (length / b.length) ** max(slope, 0.0)


def sweep(
    measurer: Measurer,
    variants: list[Variant],
    lengths: list[int],
    memory_budget_mb: float,
    on_done: Callable[[Measurement], None] = lambda m: None,
) -> list[Measurement]:
    """Measures every variant at every length, shortest first. A variant stops at the first length it
    fails at or is predicted to exceed `memory_budget_mb` at (full attention, sooner or later); the
    lengths it leaves out are recorded as skipped."""
    if not lengths or any(n <= 0 for n in lengths):
        raise ValueError(f"lengths must be positive, got {lengths}")
    results = []
    for variant in variants:
        done: list[Measurement] = []
        stop_reason = ""
        for length in sorted(set(lengths)):
            if not stop_reason and (peak := _predicted_peak_mb(done, length)) > memory_budget_mb:
                stop_reason = f"skipped: predicted peak {peak:.0f} MB > budget {memory_budget_mb:.0f} MB"
            if stop_reason:
                result = Measurement.failed(variant, length, stop_reason)
            else:
                result = measurer.measure(variant, length)
                if result.ok:
                    done.append(result)
                else:
                    stop_reason = f"skipped: failed at {length} tokens"
            results.append(result)
            on_done(result)
    return results
