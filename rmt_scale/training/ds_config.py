"""DeepSpeed configs: load the JSON, fill ``"auto"`` from the flags, and refuse bad ones before any work.

DeepSpeed accepts unknown top-level keys silently and checks batch sizes only once the model is built, so
both are checked here first, with a message that names the fix.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import TrainConfig

# Top-level keys DeepSpeed 0.16-0.19 reads (its docs' config reference).
KNOWN_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 amp
torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor gradient_allreduce_op sparse_gradients
zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing aio
steps_per_print wall_clock_breakdown dump_state memory_breakdown flops_profiler tensorboard wandb csv_monitor comet
comms_logger elasticity data_efficiency curriculum_learning compression_training checkpoint data_types
communication_data_type seq_parallel_communication_data_type sparse_attention pipeline autotuning disable_allgather
dataloader_drop_last eigenvalue progressive_layer_drop quantize_training weight_quantization nebula
use_data_before_expert_parallelism use_node_local_storage timers graph_harvesting compile hybrid_engine
tensor_parallel sequence_parallel_size zero_quantized_weights zero_quantized_gradients disable_python_gc
""".split())


def load_ds_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--ds_config={path!r} does not exist: pass a JSON file such as ds_configs/zero3.json.")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--ds_config={path!r} is not valid JSON: {error}.") from None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(raw: dict, config: TrainConfig, world_size: int) -> dict:
    """A complete DeepSpeed config: ``"auto"`` filled from ``config``, everything checked."""
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown DeepSpeed config keys {unknown} in --ds_config={config.ds_config!r}: check their "
                         "spelling against https://www.deepspeed.ai/docs/config-json/.")
    ds = copy.deepcopy(raw)
    global_batch = config.micro_batch_size * config.grad_accum * world_size
    fills = {
        ("train_micro_batch_size_per_gpu",): config.micro_batch_size,
        ("gradient_accumulation_steps",): config.grad_accum,
        ("train_batch_size",): global_batch,
        ("gradient_clipping",): config.grad_clip,
        ("optimizer", "params", "lr"): config.lr,
        ("optimizer", "params", "weight_decay"): config.weight_decay,
        ("scheduler", "params", "warmup_max_lr"): config.lr,
        ("scheduler", "params", "warmup_num_steps"): max(1, min(config.warmup_steps, config.max_steps)),
        ("scheduler", "params", "total_num_steps"): config.max_steps,
    }
    for keys, value in fills.items():
        _fill_auto(ds, keys, value)
    _check_no_auto_left(ds)
    _check_batch_sizes(ds, world_size)
    _check_zero_section(ds)
    if config.backprop == "replay" and zero_stage(ds) >= 2:
        raise ValueError(f"--backprop=replay cannot run with ZeRO stage {zero_stage(ds)}: replay runs a backward "
                         "per segment inside the step, so ZeRO's gradient hooks reduce each parameter several "
                         "times. Use --backprop=checkpoint (same peak memory per segment) or a ZeRO-0/1 config.")
    return ds


def _fill_auto(ds: dict, keys: tuple[str, ...], value) -> None:
    node = ds
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    if node.get(keys[-1]) == "auto":
        node[keys[-1]] = value


def _check_no_auto_left(ds, path: str = "") -> None:
    if isinstance(ds, dict):
        for key, value in ds.items():
            _check_no_auto_left(value, f"{path}.{key}" if path else key)
    elif ds == "auto":
        raise ValueError(f"DeepSpeed config key {path!r} is 'auto' but no flag fills it: give it a value.")


def _check_batch_sizes(ds: dict, world_size: int) -> None:
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps", 1)
    total = ds.get("train_batch_size")
    if micro is None or total is None:
        raise ValueError("the DeepSpeed config needs train_micro_batch_size_per_gpu and train_batch_size "
                         "(set them to \"auto\" to take --micro_batch_size and --grad_accum).")
    if total != micro * accum * world_size:
        raise ValueError(f"train_batch_size={total} must equal train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={accum} x {world_size} ranks = {micro * accum * world_size}: "
                         "fix the numbers or set them to \"auto\".")


def _check_zero_section(ds: dict) -> None:
    section = ds.get("zero_optimization")
    if section is None:
        return
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # pydantic, forbids unknown keys
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**section)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"bad zero_optimization section in the DeepSpeed config: {problems}.") from None
