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
from ..model.activations import LayerOffload, checkpoint_layers
from .config import TrainConfig
from ..runtime.device import select_accelerator
from .distributed import DistInfo, free_port, launched_by_mpi, mpi_master_port

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
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    remove_shm_buffer(rank)


def remove_shm_buffer(rank: int) -> None:
    """Unlinks this rank's buffer of DeepSpeed's shared-memory allreduce (CPU ranks on one machine), which
    DeepSpeed leaves behind: 64 MiB of /dev/shm (RAM) per rank per run, until the machine runs out. Peers
    that still map it keep their mapping."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


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
        ("scheduler", "params", "total_num_steps"): config.max_steps,
    }
    for keys, value in fills.items():
        _fill_auto(ds, keys, value)
    _fill_flops_profiler(ds, config)
    _check_no_auto_left(ds)
    _check_batch_sizes(ds, data_parallel)
    _check_zero_section(ds)
    if stages > 1 or "pipeline" in ds:
        _check_pipeline(ds, config)
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


def _check_batch_sizes(ds: dict, data_parallel: int) -> None:
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps", 1)
    total = ds.get("train_batch_size")
    if micro is None or total is None:
        raise ValueError("the DeepSpeed config needs train_micro_batch_size_per_gpu and train_batch_size "
                         "(set them to \"auto\" to take --micro_batch_size and --grad_accum).")
    if total != micro * accum * data_parallel:
        raise ValueError(f"train_batch_size={total} must equal train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={accum} x {data_parallel} data-parallel ranks = "
                         f"{micro * accum * data_parallel}: fix the numbers or set them to \"auto\".")


# ---------------------------------------------------------------------- the pipeline block
def pipeline_stages(ds: dict, world_size: int) -> int:
    """``pipeline.stages`` of the config (1 without the block), checked against the number of ranks."""
    block = ds.get("pipeline") or {}
    stages = block.get("stages", 1)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"pipeline.stages={stages!r} in the DeepSpeed config must be a positive integer.")
    if world_size % stages:
        raise ValueError(f"pipeline.stages={stages} does not divide the {world_size} ranks: start a multiple of "
                         f"{stages} ranks (stages x data-parallel replicas), or change pipeline.stages.")
    return stages


PARTITIONS = ("uniform", "parameters")


def _check_pipeline(ds: dict, config: TrainConfig) -> None:
    partition = ds["pipeline"].get("partition", "uniform")
    if partition not in PARTITIONS:
        raise ValueError(f"pipeline.partition={partition!r}: use 'uniform' (the same number of layers per stage; "
                         "best when only answers are labelled, as in the tasks) or 'parameters' (the last stage "
                         "also counts the LM head's parameters; best when every token is labelled).")
    chains = ds["pipeline"].get("chains", 1)
    if not isinstance(chains, int) or not 1 <= chains <= config.micro_batch_size:
        raise ValueError(f"pipeline.chains={chains!r} must be between 1 and the micro-batch size "
                         f"({config.micro_batch_size}): it is how many groups of samples are in flight. Raise "
                         f"--micro_batch_size or lower the config's chains.")
    if zero_stage(ds) > 1:
        raise ValueError(f"ZeRO stage {zero_stage(ds)} cannot run with pipeline stages: every stage runs a backward "
                         "per segment, which ZeRO-2/3's gradient hooks would reduce several times (DeepSpeed's own "
                         "pipeline engine refuses them too). Use ZeRO stage 0 or 1 in a pipeline config (optimizer "
                         "offload works with 1), or a ZeRO-3 config without a pipeline block.")
    if ds.get("activation_checkpointing", {}).get("partition_activations"):
        raise ValueError("activation_checkpointing.partition_activations has no meaning for pipeline stages: "
                         "remove it (cpu_checkpointing moves what a stage stashes per segment to host memory).")
    if ds.get("flops_profiler", {}).get("enabled"):
        raise ValueError("the flops_profiler block is not supported with pipeline stages (it profiles one module "
                         "call, and a stage's work is spread over the step): profile without the pipeline block.")


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
    inputs in host memory (``activations.py``). ARMT gets the per-segment checkpointing only. Returns ``(the model config to build, checkpoint the layers,
    offload their inputs)``."""
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


# ---------------------------------------------------------------------- the engine
def build_engine(build_model: Callable[[RMTConfig], torch.nn.Module], model_config: RMTConfig, ds_config: dict,
                 collective_timeout_s: float) -> DataParallelEngine:
    """``build_model(model config after the activation mapping)`` in a DeepSpeed engine. Under ZeRO-3 an
    ``HfDeepSpeedConfig`` exists while the model is built, so ``from_config``/``from_pretrained`` build it
    partitioned (``deepspeed.zero.Init()`` around OPT crashes with transformers 5)."""
    import deepspeed

    if "pipeline" in ds_config:
        return _build_pipeline_engine(build_model, model_config, ds_config, collective_timeout_s)
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
    _set_group_timeouts(collective_timeout_s)
    return DataParallelEngine(engine, zero_stage(ds_config), offload, hf_ds_config)


def _set_group_timeouts(collective_timeout_s: float) -> None:
    """DeepSpeed makes its own groups (data parallelism runs in a copy of the world group), and torch gives a
    new group its default timeout (30 min on gloo), not the world group's: all get init_distributed's."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=collective_timeout_s), group)


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

    @property
    def data_rank(self) -> int:
        """This rank's index among the ranks that read different data."""
        return self.engine.global_rank

    @property
    def data_world_size(self) -> int:
        return self.engine.world_size

    def whole_model(self):
        """The model to evaluate and export (under ZeRO-3 partitioned: export inside gathered_parameters)."""
        return self.module

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


# ---------------------------------------------------------------------- pipeline stages
class StageTopology:
    """P pipeline stages x D data-parallel replicas. Rank ``r`` is stage ``r % P`` of replica ``r // P``, so a
    pipeline's stages are neighbouring ranks (on one node when P divides the GPUs per node). Also DeepSpeed's
    ``mpu`` interface: its "model parallel" group is the pipeline, so a gradient norm spans every stage."""

    def __init__(self, rank: int, world_size: int, stages: int):
        import torch.distributed as dist

        self.stages, self.replicas = stages, world_size // stages
        self.stage, self.replica = rank % stages, rank // stages
        self.stage_ranks = [self.replica * stages + s for s in range(stages)]
        # every rank creates every group, in the same order, as torch requires
        for replica in range(self.replicas):
            group = dist.new_group([replica * stages + s for s in range(stages)])
            if replica == self.replica:
                self.pipe_group = group
        for stage in range(stages):
            group = dist.new_group([r * stages + stage for r in range(self.replicas)])
            if stage == self.stage:
                self.data_group = group
        self.tied_group = None
        for replica in range(self.replicas):
            group = dist.new_group([replica * stages, replica * stages + stages - 1]) if stages > 1 else None
            if replica == self.replica and self.stage in (0, stages - 1):
                self.tied_group = group

    def get_model_parallel_group(self):
        return self.pipe_group

    def get_model_parallel_world_size(self) -> int:
        return self.stages

    def get_model_parallel_rank(self) -> int:
        return self.stage

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_world_size(self) -> int:
        return self.replicas

    def get_data_parallel_rank(self) -> int:
        return self.replica


def _build_pipeline_engine(build_model, model_config: RMTConfig, ds_config: dict,
                           collective_timeout_s: float) -> "PipelineEngine":
    import deepspeed
    import torch.distributed as dist

    from ..pipeline import PipelineStage, SegmentPipeline, head_cost_in_layers

    topology = StageTopology(dist.get_rank(), dist.get_world_size(), pipeline_stages(ds_config, dist.get_world_size()))
    model = build_model(model_config)  # the same seeds on every rank: the same initial weights
    block = ds_config["pipeline"]
    head_cost = head_cost_in_layers(model) if block.get("partition", "uniform") == "parameters" else 0.0
    stage = PipelineStage(model, topology.stage, topology.stages, head_cost)
    owned = stage.owned_parameters()
    tied = {id(p) for p in stage.tied_parameters()}
    for param in owned.values():
        # DeepSpeed counts a gradient in the norm on every "model parallel" rank that marks it, else on the
        # first stage only: the tied head's copy on the last stage must be counted once
        param.model_parallel = not (stage.is_last and id(param) in tied and not stage.is_first)
    offload = bool(ds_config.get("activation_checkpointing", {}).get("cpu_checkpointing", False))
    pipeline = SegmentPipeline(stage, topology.stage_ranks, chains=block.get("chains", 1), group=topology.pipe_group,
                               tied_group=topology.tied_group, offload_stash=offload)
    engine, _, _, _ = deepspeed.initialize(model=pipeline, model_parameters=list(owned.values()), config=ds_config,
                                           mpu=topology)
    _set_group_timeouts(collective_timeout_s)
    return PipelineEngine(engine, zero_stage(ds_config), topology, partial_model=model,
                          build_model=lambda: build_model(model_config))


class PipelineEngine(DataParallelEngine):
    """A DeepSpeed engine per pipeline stage (``rmt_scale.pipeline``): ``forward`` runs the batch's segments
    forward through the stages and ``backward`` back through them; ZeRO-0/1 reduce each stage's gradients
    over its replicas. ``module`` is this rank's share of the model; :meth:`whole_model` gathers all of it."""

    def __init__(self, engine, zero: int, topology: StageTopology, partial_model, build_model):
        super().__init__(engine, zero, None, None)
        self.topology = topology
        self.pipeline = engine.module
        self.module = partial_model
        self._build_model = build_model
        self._whole = None

    @property
    def data_rank(self) -> int:
        return self.topology.replica

    @property
    def data_world_size(self) -> int:
        return self.topology.replicas

    @property
    def offloaded_bytes(self) -> int | None:
        return self.pipeline.stashed_bytes if self.pipeline.offload_stash else None

    def step(self) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or 0.0) if boundary else None

    def whole_model(self):
        """The complete model with the current weights, on every rank: each stage's parameters gathered over
        the pipeline (for evaluation and export; it must fit a rank's host memory)."""
        import torch.distributed as dist

        own = {name: p.detach().to("cpu", copy=True) for name, p in self.pipeline.stage.owned_parameters().items()}
        shares = [None] * self.topology.stages
        dist.all_gather_object(shares, own, group=self.topology.pipe_group)
        if self._whole is None:
            self._whole = self._build_model().to(self.module.backbone.device)
        state = {name: tensor for share in shares for name, tensor in share.items()}
        missing = {name for name, p in self._whole.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise RuntimeError(f"no stage holds {sorted(missing)[:3]}: the stages do not cover the model.")
        self._whole.load_state_dict(state, strict=False)
        return self._whole
