"""The engines the trainer drives, behind one protocol (:class:`TrainEngine`): :class:`DataParallelEngine`, DeepSpeed's
ZeRO stages 0-3 around the whole model (with the activation-checkpointing mapping, the ``HfDeepSpeedConfig`` lifetime
and the ZeRO-3 gather for export), and :class:`PipelineEngine`, one pipeline stage per rank. Like torchtitan's
``parallelize.py``, it keeps parallelism out of the model and the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from unittest import mock

import torch
import torch.distributed as dist

from ..model import RMTConfig
from ..model.activations import LayerOffload, checkpoint_layers
from ..pipeline import PipelineStage, SegmentPipeline, StageTopology, head_cost_in_layers
from .distributed import set_group_timeouts
from .ds_config import activation_settings, pipeline_stages, scheduler_start, zero_stage


class TrainEngine(Protocol):
    """What the trainer and the checkpoints call. A micro-batch is ``forward``, ``backward``, ``step``: the optimizer
    step at an accumulation boundary (else DeepSpeed's bookkeeping only), returning the gradient norm before clipping
    there, else None. ``module`` is this rank's model (a stage's share of it); ``whole_model()`` the model to evaluate
    and export, on every rank, with all its weights inside ``gathered_parameters()``. ``data_rank`` and
    ``data_world_size`` place the rank among those that read different data; ``offloaded_bytes``: what the last step
    moved to host memory (None: nothing). Both engines subclass it for the calls that go to DeepSpeed alike."""

    engine: Any
    module: torch.nn.Module
    data_rank: int
    data_world_size: int

    def forward(self, batch: dict): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, skip: bool = False) -> float | None: ...
    def whole_model(self) -> torch.nn.Module: ...
    def gathered_parameters(self) -> contextlib.AbstractContextManager: ...
    @property
    def offloaded_bytes(self) -> int | None: ...

    # the lr the last optimizer step trained at (DeepSpeed's get_lr() after a step is the next step's)
    lr: float = 0.0

    def _optimizer_step(self, skip: bool) -> None:
        """``engine.step()`` at an accumulation boundary. ``skip`` (the step's loss was not finite) drops the update
        as DeepSpeed's fp16 loss scaler does on an overflow: the engine counts it in ``skipped_steps``, does not
        step the scheduler and zeroes the gradients. ZeRO's optimizers skip a step whose gradient norm is not
        finite on their own; the plain optimizer of ZeRO-0 is told to through its ``overflow`` flag."""
        self.lr = self.engine.get_lr()[0]
        optimizer = self.engine.optimizer
        if not skip or hasattr(optimizer, "overflow"):
            self.engine.step()
            return
        with mock.patch.object(optimizer, "step", lambda *args, **kwargs: None, create=True):
            optimizer.overflow = True
            try:
                self.engine.step()
            finally:
                del optimizer.overflow

    def save(self, directory: Path, tag: str) -> None:
        """Every rank writes its share (model, optimizer, ZeRO partitions) into ``directory/tag``."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> bool:
        """False when ``directory/tag`` holds no engine state for this config."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        return path is not None


def build_engine(
    build_model: Callable[[RMTConfig], torch.nn.Module],
    model_config: RMTConfig,
    ds_config: dict,
    collective_timeout_s: float,
) -> TrainEngine:
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
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    set_group_timeouts(collective_timeout_s)
    align_scheduler(engine, ds_config)
    accumulators = []
    if zero_stage(ds_config) == 3 and model_config.backprop in ("replay", "sublinear"):
        accumulators = whole_gradient_accumulators(engine.module)
        engine.module.step.replay_parameter_inputs = zero3_stand_ins
    return DataParallelEngine(engine, zero_stage(ds_config), offload, hf_ds_config, accumulators)


# ZeRO-3 under replay and sublinear backprop. Their Function takes the parameters as inputs outside any module's
# forward, where ZeRO-3 has emptied them (shape [0], the values partitioned over the ranks), and returns whole
# gradients, which autograd would refuse twice: against the shape the parameter had when its accumulator node was
# made, and when the accumulator copies a gradient into the parameter's layout. So the accumulator nodes are made
# once while each parameter is gathered and held for the run (``whole_gradient_accumulators``), the Function takes
# a stand-in of each parameter's whole shape (``zero3_stand_ins``), and the stand-in's backward gathers the
# parameter until its accumulator and ZeRO-3's reduction hook have taken the gradient.


def whole_gradient_accumulators(module: torch.nn.Module) -> list:
    """The accumulator node of every trainable parameter, made while the parameter is whole."""
    import deepspeed

    nodes = []
    for param in module.parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                nodes.append(param.view_as(param).grad_fn.next_functions[0][0])
    return nodes


def zero3_stand_ins(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_GatheredForGradient.apply(param) for param in parameters]


class _GatheredForGradient(torch.autograd.Function):
    """A stand-in of a ZeRO-3 parameter's whole shape (a broadcast zero: no memory). Its backward gathers the
    parameter and releases it once the parameter's gradient hooks (ZeRO-3's reduction first) have run; one that a
    module still holds (the top-level module's own, in its backward) is left to that module."""

    @staticmethod
    def forward(ctx, param):
        ctx.param = param
        ctx.set_materialize_grads(False)  # a parameter the chain did not use gets None, and is not gathered
        return param.new_zeros(()).expand(param.ds_shape)

    @staticmethod
    def backward(ctx, grad):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        param = ctx.param
        if grad is None or param.ds_status == ZeroParamStatus.AVAILABLE:
            return grad
        param.all_gather()

        def release(param):
            handle.remove()
            param.partition()

        handle = param.register_post_accumulate_grad_hook(release)
        return grad


def align_scheduler(engine, ds_config: dict) -> None:
    """Step 1 trains at the scheduler's iteration ``scheduler_start`` (ds_config.py says why); a resume then loads
    the checkpoint's iteration and lr over it."""
    start = scheduler_start(ds_config)
    if start is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.step(start)


class DataParallelEngine(TrainEngine):
    """DeepSpeed's engine for ZeRO stages 0-3, each rank running the whole model on its own data."""

    def __init__(self, engine, stage: int, offload: LayerOffload | None, hf_ds_config, accumulators=()):
        self.engine, self.zero_stage, self.offload, self._hf_ds_config = engine, stage, offload, hf_ds_config
        self._gradient_accumulators = list(accumulators)  # whole_gradient_accumulators: alive as long as the engine
        self.module = engine.module
        self.data_rank, self.data_world_size = engine.global_rank, engine.world_size
        self._step_begins = True

    def whole_model(self):
        return self.module  # under ZeRO-3 partitioned: export inside gathered_parameters

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
        if not (
            self.zero_stage == 3
            and engine.flops_profiler_enabled()
            and engine.global_rank == 0
            and engine.global_steps == engine.flops_profiler_profile_step()
        ):
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

        plain = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear)
        return mock.patch.object(torch.nn.functional, "linear", plain)

    def backward(self, loss: torch.Tensor) -> None:
        with self._plain_linear_while_profiled():  # checkpointed segments recompute with the same function
            self.engine.backward(loss)

    def step(self, skip: bool = False) -> float | None:
        """ZeRO stages compute the norm while reducing their partitions; without ZeRO every rank holds the whole
        (already averaged) gradient after backward."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None
        self._step_begins = True
        norm = None
        if self.zero_stage == 0:
            grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm().item() if grads else 0.0
        self._optimizer_step(skip)
        return norm if norm is not None else float(self.engine.get_global_grad_norm() or 0.0)

    @property
    def offloaded_bytes(self) -> int | None:  # the layers' inputs, with cpu_checkpointing
        return None if self.offload is None else self.offload.offloaded_bytes

    def gathered_parameters(self):
        if self.zero_stage != 3:  # else gather ZeRO-3's partitions
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)


def _build_pipeline_engine(
    build_model, model_config: RMTConfig, ds_config: dict, collective_timeout_s: float
) -> PipelineEngine:
    import deepspeed

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
    pipeline = SegmentPipeline(
        stage,
        topology.stage_ranks,
        chains=block.get("chains", 1),
        group=topology.pipe_group,
        tied_group=topology.tied_group,
        offload_stash=offload,
        sublinear=model_config.backprop == "sublinear",
        keep_every=model_config.state_keep_every,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=pipeline, model_parameters=list(owned.values()), config=ds_config, mpu=topology
    )
    set_group_timeouts(collective_timeout_s)
    align_scheduler(engine, ds_config)
    return PipelineEngine(engine, topology, partial_model=model, build_model=lambda: build_model(model_config))


class PipelineEngine(TrainEngine):
    """A DeepSpeed engine per pipeline stage (``rmt_scale.pipeline``): ``forward`` runs the batch's segments
    forward through the stages and ``backward`` back through them; ZeRO-0/1 reduce each stage's gradients
    over its replicas. ``module`` is this rank's share of the model; :meth:`whole_model` gathers all of it."""

    def __init__(self, engine, topology: StageTopology, partial_model, build_model):
        self.engine, self.pipeline, self.module, self.topology = engine, engine.module, partial_model, topology
        self.data_rank, self.data_world_size = topology.replica, topology.replicas
        self._build_model, self._whole = build_model, None

    def forward(self, batch: dict):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, skip: bool = False) -> float | None:
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None
        self._optimizer_step(skip)
        return float(self.engine.get_global_grad_norm() or 0.0)

    @property
    def offloaded_bytes(self) -> int | None:  # what the stages stash per segment, with cpu_checkpointing
        return self.pipeline.stashed_bytes if self.pipeline.offload_stash else None

    @property
    def stash_peak_bytes(self) -> int:
        """The most this stage held stashed at once in the last step (it grows with S, or sqrt(S) when sublinear)."""
        return self.pipeline.last_run.stash_peak_bytes

    def gathered_parameters(self):
        return contextlib.nullcontext()  # ZeRO-0/1: every stage holds its parameters whole

    def whole_model(self):
        """The complete model with the current weights, on every rank: each stage's parameters gathered over
        the pipeline (for evaluation and export; it must fit a rank's host memory)."""
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
