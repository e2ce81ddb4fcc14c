"""The schedule of a chain of segments over pipeline stages: forward segment by segment, then backward from
the last segment to the first, with exact gradients.

A batch is cut into ``chains`` groups of samples; each group is a chain of segments. Every stage runs the
items ``(segment t, chain b)`` in the same order, forward in ``(t, b)`` order and backward in the reverse
order, so a message is always received in the order it was sent and the schedule cannot deadlock.

- Forward runs without autograd. A stage stashes, per item, only what it received, the state it read and
  the RNG state, and sends its output on: to the next stage or, from the last stage, RMT's written memory
  back to stage 0 for the chain's next segment.
- Backward recomputes each item with autograd from its stash (as memory replay does, so dropout draws the
  same masks) and backpropagates the loss together with the gradients of what the item sent (received from
  the next stage, or from stage 0 for RMT's memory) and of the state it wrote (kept by the stage itself,
  from the chain's next segment: ARMT's layer-local memory). It sends the gradients of what it received
  back to where it came from. ``bptt_depth`` cuts exactly the state gradients the one-process model cuts.
- The stash grows with the number of segments S. With ``sublinear`` the forward stashes only the first
  segment of every block of k (with the RNG state there), and the backward runs block by block, last block
  first: every stage runs the block forward again without autograd from that segment, stashing its items,
  then backpropagates them. A stage then holds at most S/k + k segments' stash per chain (k = ceil(sqrt(S))
  by default) for one more forward per segment. Messages keep their order on every pair of stages; one
  needs care: stage 0's gradient of the memory that came round into a block's first segment belongs to the
  previous block's backward, so it is sent after that block's recomputation, when the last stage expects it.

How full the pipeline is depends on what crosses stages. ARMT's memory stays in its stage, so stage p
runs segment t while stage p+1 runs segment t-1: one chain fills P stages after P-1 steps (ideal busy
fraction S / (S + P - 1) over S segments). RMT's memory goes from the last stage back to the first, so one
chain keeps one stage busy at a time; ``chains >= P`` chains in flight fill the pipeline.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.modeling import RMTOutput
from ..model.recurrence import backpropagate, keep_interval, keeps_gradient
from ..model.segments import IGNORE_INDEX, Segment
from ..rng import restored_torch_rng, torch_rng_state
from .stages import PipelineStage


@dataclass
class PipelineStep:
    """What :meth:`SegmentPipeline.forward_backward` measured."""

    loss: float  # mean over the batch's labelled tokens, as the one-process model's loss
    num_segments: int
    busy_s: float  # time this stage spent computing (forward and recomputation+backward)
    step_s: float  # wall time of the whole forward-backward
    timeline: list[tuple[str, int, int, float, float]]  # ("forward"/"backward", segment, chain, start s, end s)
    stash_peak_bytes: int = 0  # the most this stage held stashed at once (items and blocks' first segments)
    stash_peak_items: int = 0  # ... counted in stashed items (segment, chain)

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.step_s if self.step_s else 0.0


def ideal_busy_fraction(num_segments: int, num_stages: int, chains: int, associative: bool) -> float:
    """The busy fraction of a stage if every item took the same time and messages were free."""
    items = num_segments * chains
    if associative:
        return items / (items + num_stages - 1)
    # RMT: a chain's next segment waits for a whole trip round the pipe; `chains` chains share the trip
    rounds = num_segments * max(num_stages, chains) + min(chains, num_stages) - 1
    return items / rounds


class SegmentPipeline(nn.Module):
    """Runs one stage's part of the segment schedule.

    Args:
        stage: this rank's :class:`PipelineStage`.
        stage_ranks: the global ranks of this pipeline's stages, in stage order.
        chains: how many groups of samples are in flight (at most the batch size).
        group: the process group of this pipeline's stages (None: the world, for a single pipeline).
        tied_group: the process group of the first and last stage of this pipeline when they hold a tied
            head (``PipelineStage.tied_parameters``), else None.
        offload_stash: hold what the stage stashes per item (what it received, the state it read) in host
            memory, pinned when it comes from CUDA; ``stashed_bytes`` counts it per step (on a CPU-only
            machine, what would have moved off an accelerator), summed over the pipeline's stages.
        sublinear: stash only every ``keep_every``-th segment (0: ceil(sqrt(S))) and recompute the blocks
            between them in backward (``--backprop sublinear``); else every item is stashed.
    """

    def __init__(
        self,
        stage: PipelineStage,
        stage_ranks: list[int],
        chains: int = 1,
        group=None,
        tied_group=None,
        offload_stash: bool = False,
        sublinear: bool = False,
        keep_every: int = 0,
    ):
        if len(stage_ranks) != stage.num_stages:
            raise ValueError(f"{len(stage_ranks)} ranks given for {stage.num_stages} stages.")
        if chains < 1:
            raise ValueError(f"chains={chains}: at least one chain of segments must be in flight.")
        super().__init__()
        self.stage, self.stage_ranks, self.chains = stage, stage_ranks, chains
        self.group, self.tied_group = group, tied_group
        self.rank = stage_ranks[stage.stage]
        self._loopback: collections.deque = collections.deque()  # one stage: the memory it sends itself
        self._pending: list = []
        self.offload_stash = offload_stash
        self.sublinear, self.keep_every = sublinear, keep_every
        self.stashed_bytes = 0

    # ------------------------------------------------------------------ messages
    def _source(self, t: int) -> int | None:
        if not self.stage.is_first:
            return self.stage_ranks[self.stage.stage - 1]
        return self.stage_ranks[-1] if self.stage.memory_turns_around and t > 0 else None

    def _destination(self, t: int, num_segments: int) -> int | None:
        if not self.stage.is_last:
            return self.stage_ranks[self.stage.stage + 1]
        return self.stage_ranks[0] if self.stage.memory_turns_around and t < num_segments - 1 else None

    def _send(self, peer: int, tensors) -> None:
        if peer == self.rank:
            self._loopback.append(tuple(tensors))
            return
        # one message per item: each message costs a round of gloo's (or NCCL's) latency
        packed = torch.cat([tensor.reshape(-1) for tensor in tensors])
        # a send's buffer lives until the peer took it: the finished ones go, so the buffers do not grow with S
        self._pending = [sent for sent in self._pending if not sent[0].is_completed()]
        self._pending.append((dist.isend(packed, peer), packed))

    def _post_recv(self, peer: int | None, shapes, dtype: torch.dtype) -> _Posted | None:
        """Posts the receive of one item's message. Posted ahead of the item, the message can arrive while
        the stage still computes the items before it, rather than after the stage starts waiting for it."""
        if peer is None:
            return None
        if peer == self.rank:
            return _Posted(None, None, shapes)
        packed = torch.empty(
            sum(math.prod(shape) for shape in shapes), dtype=dtype, device=self.stage.model.backbone.device
        )
        return _Posted(dist.irecv(packed, peer), packed, shapes)

    def _take(self, posted: _Posted | None) -> tuple[torch.Tensor, ...]:
        if posted is None:
            return ()
        if posted.work is None:
            return self._loopback.popleft()
        posted.work.wait()
        sizes = [math.prod(shape) for shape in posted.shapes]
        return tuple(part.view(shape) for part, shape in zip(posted.packed.split(sizes), posted.shapes))

    # ------------------------------------------------------------------ the step
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> RMTOutput:
        """Runs the batch forward through the stages; ``loss`` (the mean over the batch's labelled tokens, the
        same on every stage) backpropagates through them. The memory is not returned: it lives on the stages."""
        if labels is None:
            raise ValueError("a pipeline step trains: pass labels (evaluate the exported model instead).")
        run = _Run(self, input_ids, attention_mask, labels)
        anchor = torch.zeros((), requires_grad=True)  # the loss depends on parameters autograd cannot see
        loss = _ChainOfSegments.apply(run, anchor)
        self.last_run = run
        return RMTOutput(loss=loss, num_segments=run.num_segments)

    def forward_backward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> PipelineStep:
        """One forward and backward (gradients accumulate into ``.grad``); what it measured."""
        output = self(input_ids, attention_mask, labels)
        output.loss.backward()
        return self.last_run.measured(output.loss.item())

    def _to_host(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not self.offload_stash:
            return tensors
        self.stashed_bytes += _nbytes(tensors)
        return tuple(_pinned_copy(x) if x.is_cuda else x for x in tensors)

    def _forward_items(self, run: _Run) -> float:
        self.stashed_bytes = 0
        loss_sum = self._forward(run, range(run.num_segments), recompute=False)
        # on the stage's device: NCCL communicates only CUDA tensors
        loss = torch.tensor([loss_sum / run.num_targets if self.stage.is_last else 0.0], device=run.device)
        dist.broadcast(loss, self.stage_ranks[-1], group=self.group)
        return float(loss)

    def _forward(self, run: _Run, segments: range, recompute: bool) -> float:
        """Runs the items of ``segments`` forward without autograd; their summed loss. The first pass runs every
        segment and stashes every item, or with sublinear blocks each block's first item only; a recomputation
        runs one block again from its first item and stashes each of its items."""
        chains, loss_sum = range(len(run.chains)), 0.0
        items = [(t, b) for t in segments for b in chains]
        first = {b: run.pop_block_start(segments.start, b) for b in chains} if recompute else {}
        for b, (_, state) in first.items():
            run.states[b] = tuple(x.to(run.device, non_blocking=True) for x in state)

        def from_stash(t: int) -> bool:  # the memory that came round into a recomputed block is in its stash
            return recompute and t == segments.start and self.stage.is_first

        def post(t: int, b: int):
            source = None if from_stash(t) else self._source(t)
            return self._post_recv(source, self.stage.received_shapes(run.chains[b][t], t), run.dtype)

        inbox = _Inbox(items, post)
        for t, b in items:
            segment = run.chains[b][t]
            received = self._take(inbox.next())
            if from_stash(t):
                received = tuple(x.to(run.device, non_blocking=True) for x in first[b][0])
            tick = time.perf_counter()
            rng = torch_rng_state()
            if not recompute and run.every > 1 and t % run.every == 0:
                kept_received = self._to_host(received) if self.stage.is_first else ()
                run.keep_block_start(t, b, rng, (kept_received, self._to_host(run.states[b])))
            with torch.no_grad():
                out = self.stage(segment, received, run.states[b])
            run.record("forward", t, b, tick)
            if recompute or run.every == 1:
                kept = (self._to_host(received), self._to_host(run.states[b]))
                run.keep_item(t, b, (*kept, rng, [tuple(x.shape) for x in out.sent]))
            run.states[b] = out.state
            if out.loss is not None and not recompute:
                loss_sum += float(out.loss)
            destination = self._destination(t, run.num_segments)
            if recompute and self.stage.is_last and t == segments.stop - 1:
                destination = None  # the next block's first segment kept this memory in the first pass
            if destination is not None:
                self._send(destination, out.sent)
        return loss_sum

    def _backward_items(self, run: _Run, grad_loss: torch.Tensor) -> None:
        scale = grad_loss.detach().float() / run.num_targets
        state_grads: list = [None] * len(run.chains)
        table = _EmbeddingGradients(self.stage) if self.stage.is_first and self.stage.embeddings_train else None
        deferred: list = []
        for block in reversed(run.blocks):
            if run.every > 1:
                with restored_torch_rng(run.block_rng.pop(block.start)):
                    self._forward(run, block, recompute=True)
            for peer, grads in deferred:
                self._send(peer, grads)
            deferred = self._backward_block(run, block, scale, state_grads, table)
        if table is not None:
            tick = time.perf_counter()
            table.flush()
            run.record("backward", 0, 0, tick)
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
        if self.tied_group is not None:
            for param in self.stage.tied_parameters():
                dist.all_reduce(param.grad, group=self.tied_group)
        if self.offload_stash:  # report the pipeline's total, not one stage's share
            total = torch.tensor([float(self.stashed_bytes)], device=run.device)
            dist.all_reduce(total, group=self.group)
            self.stashed_bytes = int(total)
        run.finished = time.perf_counter()

    def _backward_block(self, run: _Run, block: range, scale, state_grads: list, table) -> list:
        """Backpropagates the stashed items of ``block``, last first. Returns the gradients stage 0 holds back
        for the memory that came round into the block's first segment (see the module's docstring)."""
        num_segments, depth = run.num_segments, run.bptt_depth

        def post_grad_recv(t: int, b: int):
            gets_memory_grad = not self.stage.is_last or keeps_gradient(t + 1, num_segments, depth)
            destination = self._destination(t, num_segments) if gets_memory_grad else None
            return self._post_recv(destination, run.stash[t, b][3], run.dtype)

        items = [(t, b) for t in block for b in range(len(run.chains))]
        inbox = _Inbox(items[::-1], post_grad_recv)
        held_back = []
        for t, b in reversed(items):
            segment = run.chains[b][t]
            grad_sent = self._take(inbox.next()) or None
            received, state, rng, _ = run.pop_item(t, b)
            tick = time.perf_counter()
            tokens = table.tokens(segment) if table is not None else None
            received = tuple(_leaf(x.to(run.device, non_blocking=True)) for x in received)
            state = tuple(_leaf(x.to(run.device, non_blocking=True)) for x in state)
            with torch.enable_grad(), restored_torch_rng(rng):
                out = self.stage(segment, received, state, tokens)
            pairs = [] if out.loss is None else [(out.loss, scale.to(out.loss))]
            backpropagate([*pairs, *zip(out.sent, grad_sent or ()), *zip(out.state, state_grads[b] or ())])
            if table is not None:
                table.add(segment.input_ids, tokens)
            cut = t > 0 and not keeps_gradient(t, num_segments, depth)
            state_grads[b] = None if cut else [x.grad for x in state]
            run.record("backward", t, b, tick)
            source = self._source(t)
            if source is not None and (not self.stage.is_first or not cut):
                grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in received]
                if self.stage.is_first and t == block.start and t > 0:
                    held_back.append((source, grads))
                else:
                    self._send(source, grads)
        return held_back


class _EmbeddingGradients:
    """Stage 0's backward into its token embedding table, done for many segments at once.

    The table's gradient is dense (vocabulary x width): backpropagated segment by segment, each segment
    would pay for a whole table's gradient, which makes stage 0 the slowest stage. Instead each segment
    backpropagates into its looked-up token embeddings (:meth:`tokens`, a leaf), and the rows' gradients
    go into the table together once they number a vocabulary's worth (so the buffer never holds more
    than one table gradient) and at the end of the step."""

    def __init__(self, stage: PipelineStage):
        self.stage = stage
        self.capacity = stage.model.backbone.get_input_embeddings().num_embeddings
        self.ids, self.grads, self.rows = [], [], 0

    def tokens(self, segment: Segment) -> torch.Tensor:
        with torch.no_grad():
            return _leaf(self.stage.embed_tokens(segment.input_ids))

    def add(self, input_ids: torch.Tensor, tokens: torch.Tensor) -> None:
        if tokens.grad is None:  # the segment got no gradient (beyond bptt_depth)
            return
        self.ids.append(input_ids.reshape(-1))
        self.grads.append(tokens.grad.reshape(input_ids.numel(), -1))
        self.rows += input_ids.numel()
        if self.rows >= self.capacity:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            with torch.enable_grad():  # the step's backward runs inside an autograd Function's backward
                torch.autograd.backward(self.stage.embed_tokens(torch.cat(self.ids)), torch.cat(self.grads))
        self.ids, self.grads, self.rows = [], [], 0


@dataclass
class _Posted:
    work: object | None  # None: a message to itself (one stage), taken from the loopback queue
    packed: torch.Tensor | None
    shapes: list[tuple[int, ...]]


class _Inbox:
    """The receives of a run of items, each posted ``ahead`` items before the item that takes it."""

    def __init__(self, items: list[tuple[int, int]], post, ahead: int = 2):
        self._items, self._post, self._ahead = items, post, ahead
        self._posted: collections.deque = collections.deque()
        self._next = 0

    def next(self):
        while self._next < len(self._items) and len(self._posted) <= self._ahead:
            self._posted.append(self._post(*self._items[self._next]))
            self._next += 1
        return self._posted.popleft()


class _Run:
    """One batch on its way through the pipeline: its chains of segments and what the backward needs."""

    def __init__(self, pipeline: SegmentPipeline, input_ids, attention_mask, labels):
        self.started = time.perf_counter()
        self.pipeline = pipeline
        model = pipeline.stage.model
        segments, targets, _ = model.segments(input_ids, attention_mask, labels)
        self.num_targets = int((targets != IGNORE_INDEX).sum())
        if self.num_targets == 0:
            raise ValueError("the batch has no labelled token: a pipeline step needs a loss to backpropagate.")
        self.chains = _split_chains(segments, min(pipeline.chains, input_ids.shape[0]))
        self.num_segments = len(segments)
        self.dtype = model.backbone.get_input_embeddings().weight.dtype
        self.device = model.backbone.get_input_embeddings().weight.device
        self.bptt_depth = model.config.bptt_depth
        self.states = [pipeline.stage.initial_state(chain[0].input_ids.shape[0]) for chain in self.chains]
        mode = "sublinear" if pipeline.sublinear else "replay"
        self.every = keep_interval(mode, self.num_segments, pipeline.keep_every)
        # stashing every item, the backward is one block: its receives are posted ahead across segments
        starts = range(0, self.num_segments, self.every) if self.every > 1 else [0]
        ends = [*starts[1:], self.num_segments]
        self.blocks = [range(start, end) for start, end in zip(starts, ends)]
        self.stash: dict = {}  # (segment, chain): (received, state, rng, shapes of what it sent)
        self.block_starts: dict = {}  # (segment, chain): (received, state) of a sublinear block's first segment
        self.block_rng: dict = {}  # segment: the RNG state before a block's first item
        self.stash_bytes = self.stash_peak_bytes = self.stash_peak_items = 0
        self.busy_s = 0.0
        self.finished = None
        self.timeline: list[tuple[str, int, int, float, float]] = []

    def keep_item(self, t: int, b: int, entry: tuple) -> None:
        self.stash[t, b] = entry
        self._count(_nbytes(entry[:2]))

    def pop_item(self, t: int, b: int) -> tuple:
        entry = self.stash.pop((t, b))
        self.stash_bytes -= _nbytes(entry[:2])
        return entry

    def keep_block_start(self, t: int, b: int, rng: dict, entry: tuple) -> None:
        self.block_rng.setdefault(t, rng)
        self.block_starts[t, b] = entry
        self._count(_nbytes(entry))

    def pop_block_start(self, t: int, b: int) -> tuple:
        entry = self.block_starts.pop((t, b))
        self.stash_bytes -= _nbytes(entry)
        return entry

    def _count(self, added: int) -> None:
        self.stash_bytes += added
        self.stash_peak_bytes = max(self.stash_peak_bytes, self.stash_bytes)
        self.stash_peak_items = max(self.stash_peak_items, len(self.stash) + len(self.block_starts))

    def record(self, kind: str, t: int, b: int, tick: float) -> None:
        now = time.perf_counter()
        self.busy_s += now - tick
        self.timeline.append((kind, t, b, tick - self.started, now - self.started))

    def measured(self, loss: float) -> PipelineStep:
        step_s = (self.finished or time.perf_counter()) - self.started
        return PipelineStep(
            loss, self.num_segments, self.busy_s, step_s, self.timeline, self.stash_peak_bytes, self.stash_peak_items
        )


class _ChainOfSegments(torch.autograd.Function):
    """The forward items in forward, the backward items in backward (where ``engine.backward`` puts them)."""

    @staticmethod
    def forward(ctx, run: _Run, anchor: torch.Tensor):
        ctx.run = run
        return torch.tensor(run.pipeline._forward_items(run), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        ctx.run.pipeline._backward_items(ctx.run, grad_loss)
        ctx.run = None
        return None, None


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _nbytes(tensors) -> int:
    """Bytes of the tensors in a nest of tuples."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(x) for x in tensors)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_(tensor.is_floating_point())


def _split_chains(segments: list[Segment], chains: int) -> list[list[Segment]]:
    """The batch's segments as ``chains`` chains of sample groups (as even as possible)."""
    batch = segments[0].input_ids.shape[0]
    bounds = [round(i * batch / chains) for i in range(chains + 1)]
    return [
        [
            Segment(
                s.input_ids[lo:hi],
                s.attention_mask[lo:hi],
                None if s.targets is None else s.targets[lo:hi],
                s.return_logits,
            )
            for s in segments
        ]
        for lo, hi in zip(bounds, bounds[1:])
    ]
