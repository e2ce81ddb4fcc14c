"""The DeepSpeed JSON config, as plain dicts: read, its ``"auto"`` values filled from the flags, everything checked
before any work, and its ``activation_checkpointing`` block mapped onto what works for a recurrent model. Nothing
here starts DeepSpeed; only the ZeRO section is checked by DeepSpeed's own (pydantic) class.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from ..model import ARMTConfig, ConfigError, RMTConfig
from .config import TrainConfig

# Top-level keys DeepSpeed 0.16-0.19 reads (its docs' config reference).
KNOWN_KEYS = frozenset(
    """
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 amp
torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor gradient_allreduce_op sparse_gradients
zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing aio
steps_per_print wall_clock_breakdown dump_state memory_breakdown flops_profiler tensorboard wandb csv_monitor comet
comms_logger elasticity data_efficiency curriculum_learning compression_training checkpoint data_types
communication_data_type seq_parallel_communication_data_type sparse_attention pipeline autotuning disable_allgather
dataloader_drop_last eigenvalue progressive_layer_drop quantize_training weight_quantization nebula
use_data_before_expert_parallelism use_node_local_storage timers graph_harvesting compile hybrid_engine
tensor_parallel sequence_parallel_size zero_quantized_weights zero_quantized_gradients disable_python_gc
""".split()
)

# the blocks this module reads (and DeepSpeed's engine after it) as objects
SECTIONS = ("optimizer", "scheduler", "zero_optimization", "activation_checkpointing", "pipeline", "flops_profiler")
# scheduler params whose value is a word, not a number
WORD_PARAMS = frozenset({"warmup_type"})

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_ds_config(path: str) -> dict:
    """Reads a JSON config; a relative path not found from the working directory is looked up from the
    repository root, so ``ds_configs/zero3.json`` works from anywhere."""
    file = Path(path)
    if not file.is_file() and not file.is_absolute() and (REPO_ROOT / file).is_file():
        file = REPO_ROOT / file
    if not file.is_file():
        raise ConfigError(f"--ds_config={path!r} does not exist: pass a JSON file such as ds_configs/zero3.json.")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"--ds_config={path!r} is not valid JSON: {error}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"--ds_config={path!r} holds a JSON {_json_type(raw)}, not an object: write the config as "
            '{"key": value, ...}, as ds_configs/ddp.json does.'
        )
    return raw


def _json_type(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null", dict: "object"}
    return names.get(type(value), "number")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(raw: dict, config: TrainConfig, world_size: int) -> dict:
    """A complete DeepSpeed config: ``"auto"`` filled from ``config``, everything checked."""
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown DeepSpeed config keys {unknown} in --ds_config={config.ds_config!r}: check their "
            "spelling against https://www.deepspeed.ai/docs/config-json/."
        )
    for key in SECTIONS:
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(
                f"{key} in --ds_config={config.ds_config!r} is a JSON {_json_type(raw[key])}: make it an object, "
                'e.g. {"type": ..., "params": {...}} (see ds_configs/ddp.json).'
            )
    ds = copy.deepcopy(raw)
    stages = pipeline_stages(ds, world_size)
    data_parallel = world_size // stages
    fills = {
        ("train_micro_batch_size_per_gpu",): config.micro_batch_size,
        ("gradient_accumulation_steps",): config.grad_accum,
        ("train_batch_size",): config.micro_batch_size * config.grad_accum * data_parallel,
        ("gradient_clipping",): config.grad_clip,
        ("optimizer", "params", "lr"): config.lr,
        ("optimizer", "params", "weight_decay"): config.weight_decay,
        ("scheduler", "params", "warmup_max_lr"): config.lr,
        ("scheduler", "params", "warmup_num_steps"): max(1, min(config.warmup_steps, config.max_steps)),
    }
    for keys, value in fills.items():
        _fill_auto(ds, keys, value)
    # the decay reaches 0 one iteration after the last step's, so that the last step still trains
    _fill_auto(ds, ("scheduler", "params", "total_num_steps"), config.max_steps + (scheduler_start(ds) or 0))
    _fill_flops_profiler(ds, config)
    _check_no_auto_left(ds)
    for section in ("optimizer", "scheduler"):
        _check_optimizer_section(ds, section, config.ds_config)
    _check_batch_sizes(ds, data_parallel)
    _check_zero_section(ds)
    if stages > 1 or "pipeline" in ds:
        _check_pipeline(ds, config)
    return ds


# DeepSpeed's schedulers whose iterations engine.py aligns with the steps (``scheduler_start``)
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR")


def scheduler_start(ds: dict) -> int | None:
    """The iteration of a WarmupLR/WarmupDecayLR scheduler that step 1 trains at (None: another scheduler, or none).

    DeepSpeed sets their lr at iteration i to ``min + (max - min) * gamma(i)``, linear warmup ``gamma(i) = i / W`` for
    i < W with W = max(2, warmup_num_steps), then 1 (or the linear decay ``(total - i) / (total - W)``), and steps the
    scheduler after each optimizer step. Left alone, it sets the warmup's min lr at construction ("iteration -1"), so
    step s trains at iteration s - 2: the first two steps at lr 0, and the lr it reports after a step is the next
    step's. engine.py sets iteration 1 before step 1, so step s trains at iteration s (lr * s / W in the warmup), or
    iteration 2 with warmup_num_steps <= 1, whose warmup DeepSpeed still spreads over 2 iterations, so that
    ``--warmup_steps 0`` (or 1) trains step 1 at the full lr."""
    scheduler = ds.get("scheduler") or {}
    if scheduler.get("type") not in WARMUP_SCHEDULERS:
        return None
    warmup = (scheduler.get("params") or {}).get("warmup_num_steps", 1000)  # DeepSpeed's default
    return 2 if isinstance(warmup, int) and warmup <= 1 else 1


def _fill_auto(ds: dict, keys: tuple[str, ...], value) -> None:
    node = ds
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    if node.get(keys[-1]) == "auto":
        node[keys[-1]] = value


# ---------------------------------------------------------------------- the flops_profiler block
FLOPS_PROFILE_FILE = "flops_profile.txt"


def _fill_flops_profiler(ds: dict, config: TrainConfig) -> None:
    """DeepSpeed's engine profiles its forward call at ``profile_step`` (counted from 0: 1 is the second step),
    once per micro-batch of that step, on rank 0. ``"auto"`` puts the report at OUT/flops_profile.txt and sets
    ``recompute_fwd_factor`` (the forwards the backward repeats) from the checkpointing that will run."""
    block = ds.get("flops_profiler")
    if not block or not block.get("enabled", False):
        return
    _fill_auto(ds, ("flops_profiler", "output_file"), str(Path(config.out_dir) / FLOPS_PROFILE_FILE))
    model_config, layers_checkpointed, _ = activation_settings(config.model, ds)
    # segments recomputed once in backward (sublinear: twice, once to rebuild a block's states); checkpointed
    # layers once more inside that recomputation
    recomputed = {"bptt": 0, "sublinear": 2}.get(model_config.backprop, 1) + layers_checkpointed
    _fill_auto(ds, ("flops_profiler", "recompute_fwd_factor"), float(recomputed))
    profile_step = block.get("profile_step", 1)
    if not 0 <= profile_step < config.max_steps:
        raise ConfigError(
            f"flops_profiler.profile_step={profile_step} is never reached: DeepSpeed counts steps from "
            f"0 and this run trains --max_steps={config.max_steps}; set profile_step between 0 and "
            f"{config.max_steps - 1}."
        )


def _check_no_auto_left(ds, path: str = "") -> None:
    if isinstance(ds, dict):
        for key, value in ds.items():
            _check_no_auto_left(value, f"{path}.{key}" if path else key)
    elif ds == "auto":
        raise ConfigError(f"DeepSpeed config key {path!r} is 'auto' but no flag fills it: give it a value.")


def _check_optimizer_section(ds: dict, section: str, path: str) -> None:
    """The optimizer or scheduler block: a type DeepSpeed builds (its own or torch's) and params that are numbers
    where numbers go; DeepSpeed would fail inside torch with a traceback that names neither."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    block = ds.get(section)
    if block is None:
        return
    name = block.get("type")
    # what DeepSpeed's engine accepts: its own names (any case), else a class of torch's of that name
    if section == "optimizer":
        torch_module, own = torch.optim, DEEPSPEED_OPTIMIZERS
        known = isinstance(name, str) and name.lower() in own
    else:
        torch_module, own = torch.optim.lr_scheduler, VALID_LR_SCHEDULES
        known = name in own
    known = known or (isinstance(name, str) and isinstance(getattr(torch_module, name, None), type))
    choices = f"one of DeepSpeed's ({', '.join(own)}) or a class of {torch_module.__name__}"
    if not known:
        raise ConfigError(
            f"{section}.type={name!r} in --ds_config={path!r} is not a {section} DeepSpeed builds: use {choices}."
        )
    params = block.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{section}.params in --ds_config={path!r} must be an object of parameter values.")
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        if key in WORD_PARAMS or all(v is None or isinstance(v, (int, float)) for v in values):
            continue
        raise ConfigError(
            f"{section}.params.{key}={value!r} in --ds_config={path!r} must be a number"
            f'{" (or a list of numbers)" if isinstance(value, list) else ""}, or "auto" where a flag fills it '
            "(lr, weight_decay, the scheduler's steps and warmup_max_lr)."
        )


def _check_batch_sizes(ds: dict, data_parallel: int) -> None:
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps", 1)
    total = ds.get("train_batch_size")
    if micro is None or total is None:
        raise ConfigError(
            "the DeepSpeed config needs train_micro_batch_size_per_gpu and train_batch_size "
            '(set them to "auto" to take --micro_batch_size and --grad_accum).'
        )
    if total != micro * accum * data_parallel:
        raise ConfigError(
            f"train_batch_size={total} must equal train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x {data_parallel} data-parallel ranks = "
            f'{micro * accum * data_parallel}: fix the numbers or set them to "auto".'
        )


# ---------------------------------------------------------------------- the pipeline block
def pipeline_stages(ds: dict, world_size: int) -> int:
    """``pipeline.stages`` of the config (1 without the block), checked against the number of ranks."""
    block = ds.get("pipeline") or {}
    stages = block.get("stages", 1)
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"pipeline.stages={stages!r} in the DeepSpeed config must be a positive integer.")
    if world_size % stages:
        raise ConfigError(
            f"pipeline.stages={stages} does not divide the {world_size} ranks: start a multiple of "
            f"{stages} ranks (stages x data-parallel replicas), or change pipeline.stages."
        )
    return stages


PARTITIONS = ("uniform", "parameters")


def _check_pipeline(ds: dict, config: TrainConfig) -> None:
    partition = ds["pipeline"].get("partition", "uniform")
    if partition not in PARTITIONS:
        raise ConfigError(
            f"pipeline.partition={partition!r}: use 'uniform' (the same number of layers per stage; "
            "best when only answers are labelled, as in the tasks) or 'parameters' (the last stage "
            "also counts the LM head's parameters; best when every token is labelled)."
        )
    chains = ds["pipeline"].get("chains", 1)
    if not isinstance(chains, int) or not 1 <= chains <= config.micro_batch_size:
        raise ConfigError(
            f"pipeline.chains={chains!r} must be between 1 and the micro-batch size "
            f"({config.micro_batch_size}): it is how many groups of samples are in flight. Raise "
            f"--micro_batch_size or lower the config's chains."
        )
    if config.micro_batch_tokens:
        raise ConfigError(
            "--micro_batch_tokens changes the micro-batch with the length, and pipeline stages split a fixed one "
            "into chains: drop it and set --micro_batch_size."
        )
    if zero_stage(ds) > 1:
        raise ConfigError(
            f"ZeRO stage {zero_stage(ds)} cannot run with pipeline stages: every stage runs a backward "
            "per segment, which ZeRO-2/3's gradient hooks would reduce several times (DeepSpeed's own "
            "pipeline engine refuses them too). Use ZeRO stage 0 or 1 in a pipeline config (optimizer "
            "offload works with 1), or a ZeRO-3 config without a pipeline block."
        )
    if ds.get("activation_checkpointing", {}).get("partition_activations"):
        raise ConfigError(
            "activation_checkpointing.partition_activations has no meaning for pipeline stages: "
            "remove it (cpu_checkpointing moves what a stage stashes per segment to host memory)."
        )
    if ds.get("flops_profiler", {}).get("enabled"):
        raise ConfigError(
            "the flops_profiler block is not supported with pipeline stages (it profiles one module "
            "call, and a stage's work is spread over the step): profile without the pipeline block."
        )


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
        raise ConfigError(f"bad zero_optimization section in the DeepSpeed config: {problems}.") from None


def activation_settings(model_config: RMTConfig, ds_config: dict) -> tuple[RMTConfig, bool, bool]:
    """Maps DeepSpeed's ``activation_checkpointing`` block onto what works for a recurrent model.

    The block does nothing by itself, and DeepSpeed's (reentrant) checkpoint breaks ZeRO-3 recurrence, so its
    presence turns on the RMT's per-segment non-reentrant checkpointing (``backprop="checkpoint"``) and, inside
    a segment, the backbone's own non-reentrant layer checkpointing; ``cpu_checkpointing`` holds the layers'
    inputs in host memory (``model/activations.py``). ARMT gets the per-segment checkpointing only. Returns
    ``(the model config to build, checkpoint the layers, offload their inputs)``."""
    block = ds_config.get("activation_checkpointing")
    if block is None or "pipeline" in ds_config:  # a pipeline stage recomputes each segment from its stash
        return model_config, False, False
    if model_config.backprop == "bptt":
        model_config = dataclasses.replace(model_config, backprop="checkpoint")
    if isinstance(model_config, ARMTConfig):
        # ARMT's associative memory is read and written by hooks around each layer inside the segment step, so
        # a layer recomputed on its own would run without it: ARMT checkpoints whole segments only
        return model_config, False, False
    return model_config, True, bool(block.get("cpu_checkpointing", False))
