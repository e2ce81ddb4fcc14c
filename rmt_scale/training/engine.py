"""Ranks and DeepSpeed, in one place: the process group, the JSON config (filled and checked before any work),
the activation-checkpointing mapping, the ZeRO engine and the ZeRO-3 gather for export. Like torchtitan's
``parallelize.py``, it keeps parallelism out of the model and the loop; a pipeline engine can sit beside
:class:`DataParallelEngine` with the same methods.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..model import ARMTConfig, RMTConfig
from .activations import LayerOffload, checkpoint_layers
from .config import TrainConfig
from .distributed import DistInfo, free_port, launched_by_mpi, mpi_master_port, select_accelerator

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

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- the process group
def init_distributed(timeout_s: float = 600) -> DistInfo:
    """Joins the process group of ``deepspeed --num_gpus N``, ``torchrun`` or ``srun`` (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT set), of ``mpirun`` or ``srun --mpi=pmi2`` (ranks found through MPI), or, under
    plain ``python``, creates a 1-rank group on a free local port so the same code path runs. Without CUDA:
    gloo, and unless OMP_NUM_THREADS says otherwise each rank takes its share of the cores minus one (torch's
    elementwise ops slow down ~100x when their threads compete with another busy process, docs/background.md).
    A collective that waits ``timeout_s`` for a peer that hangs or died raises instead of blocking, so the job
    ends (under srun, ``--wait`` then stops the rest)."""
    has_cuda = select_accelerator()
    mpi = launched_by_mpi()
    if "RANK" not in os.environ and not mpi:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    import deepspeed

    # under mpirun or srun --mpi=pmi2, DeepSpeed's MPI discovery (mpi4py) sets RANK, WORLD_SIZE, LOCAL_RANK,
    # MASTER_ADDR (rank 0's host) and MASTER_PORT, the last to distributed_port
    discovery = dict(distributed_port=mpi_master_port()) if mpi else {}
    deepspeed.init_distributed(dist_backend="nccl" if has_cuda else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s), **discovery)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not has_cuda and "OMP_NUM_THREADS" not in os.environ:
        # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; else assume one node
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks - 1))
    device = torch.device("cuda", local_rank) if has_cuda else torch.device("cpu")
    if has_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world_size, local_rank, device)


def close_distributed(*, wait_for_peers: bool) -> None:
    """Leaves the process group; launchers call it last. Left to the interpreter's exit, gloo's threads can
    abort a rank that finished first ("terminate called without an active exception", seen under srun).
    After a success the ranks first wait for each other, so none tears down connections a peer still uses;
    after an error they don't (a peer may be gone)."""
    if not torch.distributed.is_initialized():
        return
    if wait_for_peers:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------- the JSON config
def load_ds_config(path: str) -> dict:
    """Reads a JSON config; a relative path not found from the working directory is looked up from the
    repository root, so ``ds_configs/zero3.json`` works from anywhere."""
    file = Path(path)
    if not file.is_file() and not file.is_absolute() and (REPO_ROOT / file).is_file():
        file = REPO_ROOT / file
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
    fills = {
        ("train_micro_batch_size_per_gpu",): config.micro_batch_size,
        ("gradient_accumulation_steps",): config.grad_accum,
        ("train_batch_size",): config.micro_batch_size * config.grad_accum * world_size,
        ("gradient_clipping",): config.grad_clip,
        ("optimizer", "params", "lr"): config.lr,
        ("optimizer", "params", "weight_decay"): config.weight_decay,
        ("scheduler", "params", "warmup_max_lr"): config.lr,
        ("scheduler", "params", "warmup_num_steps"): max(1, min(config.warmup_steps, config.max_steps)),
        ("scheduler", "params", "total_num_steps"): config.max_steps,
    }
    for keys, value in fills.items():
        _fill_auto(ds, keys, value)
    _fill_flops_profiler(ds, config)
    _check_no_auto_left(ds)
    _check_batch_sizes(ds, world_size)
    _check_zero_section(ds)
    if config.model.backprop == "replay" and zero_stage(ds) >= 2:
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
    # segments recomputed once in backward; checkpointed layers once more inside that recomputation
    recomputed = (model_config.backprop != "bptt") + layers_checkpointed
    _fill_auto(ds, ("flops_profiler", "recompute_fwd_factor"), float(recomputed))
    profile_step = block.get("profile_step", 1)
    if not 0 <= profile_step < config.max_steps:
        raise ValueError(f"flops_profiler.profile_step={profile_step} is never reached: DeepSpeed counts steps from "
                         f"0 and this run trains --max_steps={config.max_steps}; set profile_step between 0 and "
                         f"{config.max_steps - 1}.")


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


def activation_settings(model_config: RMTConfig, ds_config: dict) -> tuple[RMTConfig, bool, bool]:
    """Maps DeepSpeed's ``activation_checkpointing`` block onto what works for a recurrent model.

    The block does nothing by itself, and DeepSpeed's (reentrant) checkpoint breaks ZeRO-3 recurrence, so its
    presence turns on the RMT's per-segment non-reentrant checkpointing (``backprop="checkpoint"``) and, inside
    a segment, the backbone's own non-reentrant layer checkpointing; ``cpu_checkpointing`` holds the layers'
    inputs in host memory (``activations.py``). Returns ``(the model config to build, checkpoint the layers,
    offload their inputs)``."""
    block = ds_config.get("activation_checkpointing")
    if block is None:
        return model_config, False, False
    if isinstance(model_config, ARMTConfig):
        raise ValueError("the DeepSpeed config's activation_checkpointing block checkpoints the backbone's layers, "
                         "which ARMT cannot do: its associative memory is read and written by hooks around each "
                         "layer, inside the segment step. Remove the block (ARMT's backprop='checkpoint' or "
                         "'replay' still recomputes each segment).")
    if model_config.backprop == "bptt":
        model_config = dataclasses.replace(model_config, backprop="checkpoint")
    return model_config, True, bool(block.get("cpu_checkpointing", False))


# ---------------------------------------------------------------------- the engine
def build_engine(build_model: Callable[[RMTConfig], torch.nn.Module], model_config: RMTConfig, ds_config: dict,
                 collective_timeout_s: float) -> DataParallelEngine:
    """``build_model(model config after the activation mapping)`` in a DeepSpeed engine. Under ZeRO-3 an
    ``HfDeepSpeedConfig`` exists while the model is built, so ``from_config``/``from_pretrained`` build it
    partitioned (``deepspeed.zero.Init()`` around OPT crashes with transformers 5)."""
    import deepspeed

    model_config, layers_checkpointed, offload_layers = activation_settings(model_config, ds_config)
    hf_ds_config = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # read through a weak reference: it must stay alive
    model = build_model(model_config)
    offload = LayerOffload() if offload_layers else None
    if layers_checkpointed:
        checkpoint_layers(model.backbone, offload)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    # DeepSpeed makes its own groups (data parallelism runs in a copy of the world group), and torch gives a
    # new group its default timeout (30 min on gloo), not the world group's: all get init_distributed's
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=collective_timeout_s), group)
    return DataParallelEngine(engine, zero_stage(ds_config), offload, hf_ds_config)


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class DataParallelEngine:
    """DeepSpeed's engine for ZeRO stages 0-3: a micro-batch is ``forward``, ``backward``, ``step``."""

    def __init__(self, engine, stage: int, offload: LayerOffload | None, hf_ds_config):
        self.engine, self.zero_stage, self.offload = engine, stage, offload
        self._hf_ds_config = hf_ds_config
        self.module = engine.module
        self._step_begins = True

    def forward(self, batch: dict):
        if self.offload is not None and self._step_begins:
            self.offload.offloaded_bytes = 0
        self._step_begins = False
        with self._plain_linear_while_profiled():
            return self.engine(**batch)

    def _plain_linear_while_profiled(self):
        """ZeRO-3 replaces ``F.linear`` with its own function (for good: "this will persist"), which calls
        ``torch.addmm``/``matmul``; DeepSpeed's flops profiler patches both levels and counts every linear layer
        twice. The profiled step runs torch's own ``F.linear``; ZeRO-3 supports it (``mem_efficient_linear``
        off) and still gathers each layer's weights for its backward."""
        engine = self.engine
        if not (self.zero_stage == 3 and engine.flops_profiler_enabled() and engine.global_rank == 0
                and engine.global_steps == engine.flops_profiler_profile_step()):
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

        return _replaced(torch.nn.functional, "linear", getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk",
                                                                torch.nn.functional.linear))

    def backward(self, loss: torch.Tensor) -> None:
        with self._plain_linear_while_profiled():  # checkpointed segments recompute with the same function
            self.engine.backward(loss)

    def step(self) -> float | None:
        """The optimizer step at an accumulation boundary (else only DeepSpeed's bookkeeping). Returns the
        global gradient norm before clipping there, else None. ZeRO stages compute it while reducing their
        partitions; without ZeRO every rank holds the whole (already averaged) gradient after backward."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None
        self._step_begins = True
        norm = None
        if self.zero_stage == 0:
            grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm().item() if grads else 0.0
        self.engine.step()
        return norm if norm is not None else float(self.engine.get_global_grad_norm() or 0.0)

    @property
    def offloaded_bytes(self) -> int | None:
        """Bytes of layer inputs moved to host memory in the last step (None without ``cpu_checkpointing``)."""
        return None if self.offload is None else self.offload.offloaded_bytes

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: Path, tag: str) -> None:
        """Every rank writes its share (model, optimizer, ZeRO partitions) into ``directory/tag``."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> bool:
        """False when ``directory/tag`` holds no engine state for this config."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        return path is not None

    def gathered_parameters(self):
        """A context in which every rank holds the whole model (ZeRO-3 partitions gathered), e.g. to export it."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
