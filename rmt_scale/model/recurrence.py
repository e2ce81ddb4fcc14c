"""Backpropagation through a chain of segments.

A *step* maps ``(state, segment) -> (new_state, loss_sum, extra)``: ``state`` is a tuple of tensors carried
between segments (memory tokens, associative matrices, ...), ``loss_sum`` a scalar summed over the segment's
labelled tokens and ``extra`` whatever the caller wants back per segment (logits, or None). The drivers below
compute the same value and the same gradients; they differ in what they keep alive:

- ``bptt``: every segment's activations (fast; memory grows with the number of segments);
- ``checkpoint``: each segment's input state only, recomputing the segment in backward;
- ``replay``: memory replay backprop. Forward runs without grad and keeps each segment's input state;
  backward recomputes segments last to first, handing the state gradient back one segment at a time;
- ``sublinear``: replay that keeps the input state of every k-th segment only (k = ceil(sqrt(S)) for S
  segments unless set). Backward recomputes a block's states from its first one, without grad, then
  replays the block: state memory O(sqrt(S)) for one more forward per segment than ``replay``. ARMT's state
  is a matrix per layer, so this is what bounds its memory on million-token inputs.

The states that ``replay`` and ``sublinear`` keep can live on the device, in host memory or in a spill file
(:class:`StateStore`). Their backward runs inside one autograd Function whose inputs include the step's
parameters: each replayed segment's parameter gradients are summed there and handed back once, so a parameter's
gradient reaches its ``.grad`` (and ZeRO-2/3's reduction hook) once per backward, as with ``bptt``.

Truncated BPTT (``bptt_depth=k``) cuts the state gradient on all but the last ``k`` transitions; segments
before those that carry no labels are then run without grad and keep nothing.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..rng import restored_torch_rng, torch_rng_state

State = tuple[torch.Tensor, ...]
Step = Callable[[State, Any], tuple[State, torch.Tensor, Any]]

SPILL_PREFIX = "rmt-states-"  # spill directories: SPILL_PREFIX + host + pid of the process that made them
FULL_DISK_BYTES = 2**20  # a failed spill that leaves less than this free counts as a full disk


class StateSpillError(OSError):
    """A segment state could not be written to its spill file (a full or read-only ``state_offload_dir``)."""


def keep_interval(mode: str, num_segments: int, keep_every: int = 0) -> int:
    """Every how many segments ``replay`` (1) and ``sublinear`` (``keep_every``, else ceil(sqrt(S))) keep a
    state; a chain of S segments keeps at most ``ceil(S / keep_interval)`` of them."""
    return 1 if mode == "replay" else keep_every or math.isqrt(num_segments - 1) + 1


@dataclass
class StateMemory:
    """What the last gradient-enabled chain kept of its states: ``kept_bytes`` at the peak, of which
    ``offloaded_bytes`` in host memory or on disk, and how many states that was."""

    kept_bytes: int = 0
    offloaded_bytes: int = 0
    kept_states: int = 0


_last_state_memory: StateMemory | None = None


def last_state_memory() -> StateMemory | None:
    """What the last replayed chain of this process kept of its states; None before the first (the trainer logs
    it as TensorBoard scalars)."""
    return _last_state_memory


def keeps_gradient(index: int, num_segments: int, bptt_depth: int) -> bool:
    """Whether the state read by segment ``index`` still carries gradient to the segment before it."""
    return bptt_depth < 0 or index >= num_segments - bptt_depth


def flowing(pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(output, gradient)`` pairs whose gradient is given and whose output needs one."""
    return [(out, grad) for out, grad in pairs if grad is not None and out.requires_grad]


def backpropagate(pairs) -> None:
    """Backward from the ``flowing`` pairs: a recomputed segment of a pipeline stage handing on the gradients
    that came back to it."""
    pairs = flowing(pairs)
    if pairs:
        torch.autograd.backward(*zip(*pairs))


def needs_backward(labelled: Sequence[bool], bptt_depth: int) -> list[bool]:
    """Which segments a backward must visit: those with labels, those whose output state carries gradient to a
    later segment, and the last (its state is the chain's output)."""
    n = len(labelled)
    return [labelled[i] or i == n - 1 or keeps_gradient(i + 1, n, bptt_depth) for i in range(n)]


def kept_at_peak(
    mode: str, labelled: Sequence[bool], bptt_depth: int = -1, keep_every: int = 0
) -> tuple[int, int, int]:
    """``(segments, kept, recomputed)``: how many segments' activations, kept input states and recomputed
    states the driver ``mode`` holds at once for a chain whose segments carry labels as ``labelled`` says. The
    kept states of ``replay`` and ``sublinear`` are those their ``StateStore`` holds (and may offload); those of
    ``bptt`` and ``checkpoint`` stay in the graph. What a memory estimate made before any work multiplies by a
    segment's and a state's bytes."""
    backward = needs_backward(labelled, bptt_depth)
    visited = sum(backward)
    if mode in ("bptt", "checkpoint"):
        return (visited if mode == "bptt" else 1), visited, 0
    every = keep_interval(mode, len(labelled), keep_every)
    kept = sum(any(backward[start : start + every]) for start in range(0, len(labelled), every))
    # sublinear recomputes one block's states, on the device, from the first one it kept
    return 1, kept, every if mode == "sublinear" else 0


def run_segments(
    step: Step,
    state: State,
    segments: Sequence[Any],
    mode: str,
    bptt_depth: int = -1,
    *,
    labelled: Sequence[bool] | None = None,
    keep_every: int = 0,
    offload: str = "none",
    offload_dir: str = "",
    parameters: Sequence[torch.Tensor] | None = None,
    parameter_inputs: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, State, list[Any]]:
    """Runs ``step`` over ``segments``; returns the summed loss, the final state and each segment's extra.

    ``labelled[i]`` says whether segment ``i`` has labelled tokens (None: all of them); ``keep_every`` is
    ``sublinear``'s k (0: ceil(sqrt(S))); ``offload`` and ``offload_dir`` say where ``replay`` and
    ``sublinear`` keep their states; ``parameters``: every tensor the step uses that takes a gradient, which
    ``replay`` and ``sublinear`` must be given (they differentiate with respect to them), and
    ``parameter_inputs`` maps them to what their Function takes in their place (the gradients of ``parameters``
    are handed to those; None: the parameters themselves; ZeRO-3 gives stand-ins, training/engine.py)."""
    if not torch.is_grad_enabled():
        return _run_loop(step, state, segments, "bptt", [False] * len(segments))
    backward = needs_backward(labelled or [True] * len(segments), bptt_depth)
    if mode in ("replay", "sublinear"):
        if parameters is None:
            raise ValueError(
                f"backprop={mode!r} differentiates with respect to the step's parameters: pass "
                "parameters=[the tensors the step uses that require grad]."
            )
        every = keep_interval(mode, len(segments), keep_every)
        store = StateStore(offload, offload_dir)
        return _run_replay(step, state, segments, bptt_depth, backward, every, store, parameters, parameter_inputs)
    return _run_loop(step, state, segments, mode, backward, bptt_depth)


def _run_loop(step: Step, state: State, segments: Sequence[Any], mode: str, backward: list[bool], bptt_depth: int = -1):
    total = None
    extras = []
    for index, segment in enumerate(segments):
        if index > 0 and not keeps_gradient(index, len(segments), bptt_depth):
            state = tuple(t.detach() for t in state)
        if not backward[index]:
            with torch.no_grad():
                state, loss, extra = step(state, segment)
        elif mode == "checkpoint":
            state, loss, extra = _checkpointed_step(step, state, segment)
        else:
            state, loss, extra = step(state, segment)
        total = loss if total is None else total + loss
        extras.append(extra)
    return total, state, extras


_first_forwards = 0  # checkpointed segments now in their first forward


def saves_are_dropped() -> bool:
    """Whether a checkpointed segment is in its first forward, where what is saved for backward is dropped
    (the backward recomputes the segment): a layer checkpoint nested inside need not offload its inputs then."""
    return _first_forwards > 0


@contextlib.contextmanager
def _first_forward():
    global _first_forwards
    _first_forwards += 1
    try:
        yield
    finally:
        _first_forwards -= 1


def _checkpointed_step(step: Step, state: State, segment: Any):
    extra_box = []

    def tensors_only(*state_in):
        new_state, loss, extra = step(tuple(state_in), segment)
        if not extra_box:  # keep the first (forward) extra; the recomputation must not append another
            extra_box.append(extra)
        return (*new_state, loss)

    # A nested layer checkpoint that offloads keeps its inputs on the device in the first forward and on the
    # host in the recomputation, so the two runs save the same tensors on different devices: torch's check of
    # their metadata would refuse that (it still checks their number).
    *new_state, loss = checkpoint(
        tensors_only,
        *state,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (_first_forward(), contextlib.nullcontext()),
        determinism_check="none",
    )
    return tuple(new_state), loss, extra_box[0]


class StateStore:
    """Where replayed chains keep segment states: ``none`` on their device, ``cpu`` in host memory (pinned,
    copied without blocking, when they come from CUDA), ``disk`` in files under ``directory`` (the system's
    temporary directory by default), removed as they are read back and, whatever happens, with the store."""

    def __init__(self, offload: str = "none", directory: str = ""):
        self.offload, self.directory = offload, directory
        self.spill_dir: str | None = None
        self.kept: dict[int, tuple] = {}  # key -> (tensors or spill path, their devices, bytes)
        self.kept_bytes = 0
        self.peak = StateMemory()

    def put(self, key: int, state: State) -> None:
        global _last_state_memory
        size = sum(t.numel() * t.element_size() for t in state)
        if self.offload == "cpu":
            stored = tuple(_to_host(t) for t in state)
        elif self.offload == "disk":
            stored = self._spill(key, state)
        else:
            stored = state
        self.kept[key] = (stored, [t.device for t in state], size)
        self.kept_bytes += size
        if self.kept_bytes >= self.peak.kept_bytes:
            offloaded = 0 if self.offload == "none" else self.kept_bytes
            self.peak = _last_state_memory = StateMemory(self.kept_bytes, offloaded, len(self.kept))

    def pop(self, key: int) -> State:
        stored, devices, size = self.kept.pop(key)
        self.kept_bytes -= size
        if self.offload == "disk":
            path = stored
            stored = torch.load(path, weights_only=True)
            os.remove(path)
        return tuple(t.to(device, non_blocking=True) for t, device in zip(stored, devices))

    def _spill(self, key: int, state: State) -> str:
        if self.spill_dir is None:
            parent = self.directory or tempfile.gettempdir()
            _remove_orphaned_spills(parent)
            try:
                self.spill_dir = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{_host()}-{os.getpid()}-", dir=parent)
            except OSError as error:
                raise StateSpillError(
                    f"cannot create a state spill directory in {parent}"
                    f" ({error.strerror}): pass a writable state_offload_dir, or state_offload='cpu'."
                ) from error
            weakref.finalize(self, shutil.rmtree, self.spill_dir, ignore_errors=True)
        path = os.path.join(self.spill_dir, f"state-{key}.pt")
        try:
            torch.save([t.detach().cpu() for t in state], path)
        except (OSError, RuntimeError) as error:
            with contextlib.suppress(OSError):
                os.remove(path)
            raise StateSpillError(
                f"cannot spill a segment state to {path} ({_spill_failure(error, self.spill_dir)}): free space "
                "there, pass another state_offload_dir, or use state_offload='cpu'."
            ) from error
        return path


def _spill_failure(error: Exception, directory: str) -> str:
    """Why a spill failed, in a few words: torch's zip writer reports a full disk as a RuntimeError
    ("unexpected pos ...", several lines) without errno."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if shutil.disk_usage(directory).free < FULL_DISK_BYTES:
        return "no space left on the device"
    return str(error).splitlines()[0]


def _host() -> str:
    return os.uname().nodename.replace("-", "_")


def _remove_orphaned_spills(parent: str) -> None:
    """Removes the spill directories that processes of this host left when they were killed (SIGKILL runs no
    cleanup): a killed run resumed with ``--resume auto`` leaves no spill files behind."""
    for entry in glob.glob(os.path.join(glob.escape(parent), f"{SPILL_PREFIX}{_host()}-*-*")):
        pid = os.path.basename(entry)[len(SPILL_PREFIX) + len(_host()) + 1 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _run_replay(
    step: Step,
    state: State,
    segments: Sequence[Any],
    bptt_depth: int,
    backward: list[bool],
    keep_every: int,
    store: StateStore,
    parameters: Sequence[torch.Tensor],
    parameter_inputs: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None,
):
    extras: list[Any] = []
    parameters = [p for p in parameters if p.requires_grad]
    plan = _ReplayPlan(step, segments, bptt_depth, backward, keep_every, store, extras, len(state), parameters)
    inputs = parameters if parameter_inputs is None else parameter_inputs(parameters)
    loss, *final_state = _MemoryReplay.apply(plan, *state, *inputs)
    return loss, tuple(final_state), extras


@dataclass
class _ReplayPlan:
    step: Step
    segments: Sequence[Any]
    bptt_depth: int
    backward: list[bool]
    keep_every: int
    store: StateStore
    extras: list[Any]
    num_state: int
    parameters: list[torch.Tensor]

    def block_start_kept(self, index: int) -> bool:
        """A block's first state is kept when a segment of the block is visited by the backward."""
        return index % self.keep_every == 0 and any(self.backward[index : index + self.keep_every])


class _MemoryReplay(torch.autograd.Function):
    """Memory replay backprop over blocks of ``keep_every`` segments (one block per segment for ``replay``).
    The inputs are the initial state and the step's parameters; the backward returns the gradients of both, so
    ``loss.backward()`` and ``torch.autograd.grad`` work as for any other function of them."""

    @staticmethod
    def forward(ctx, plan: _ReplayPlan, *state_and_parameters):
        ctx.plan = plan
        state = state_and_parameters[: plan.num_state]
        block_rng = {}
        total = None
        with torch.no_grad():
            for index, segment in enumerate(plan.segments):
                if plan.block_start_kept(index):
                    plan.store.put(index, state)
                    block_rng[index] = torch_rng_state()
                state, loss, extra = plan.step(state, segment)
                total = loss if total is None else total + loss
                plan.extras.append(extra)
        ctx.block_rng = block_rng
        return (total, *state)

    @staticmethod
    def backward(ctx, grad_loss, *grad_state):
        plan = ctx.plan
        num_segments = len(plan.segments)
        grad_state = list(grad_state)
        grad_parameters: list[torch.Tensor | None] = [None] * len(plan.parameters)
        for start in sorted(ctx.block_rng, reverse=True):
            end = min(start + plan.keep_every, num_segments)
            while not plan.backward[end - 1]:
                end -= 1
            inputs, rng_states = _recompute_block(plan, start, end, ctx.block_rng.pop(start))
            for index in reversed(range(start, end)):
                state_in, rng = inputs.pop(), rng_states.pop()
                if not plan.backward[index]:
                    grad_state = [None] * len(grad_state)
                    continue
                grad_state = _replay_segment(plan, index, state_in, rng, grad_loss, grad_state, grad_parameters)
                if index > 0 and not keeps_gradient(index, num_segments, plan.bptt_depth):
                    # earlier segments are still replayed: their own losses give parameter gradients
                    grad_state = [None] * len(grad_state)
        return (None, *grad_state, *grad_parameters)


def _recompute_block(plan: _ReplayPlan, start: int, end: int, rng: dict):
    """The input states and RNG states of segments ``start..end-1``, recomputed without grad from the block's
    kept first state with the generators it first ran with, so that dropout draws the same masks."""
    state = plan.store.pop(start)
    inputs, rng_states = [], []
    with torch.no_grad(), restored_torch_rng(rng):
        for index in range(start, end):
            inputs.append(state)
            rng_states.append(torch_rng_state())
            if index + 1 < end:
                state, _, _ = plan.step(state, plan.segments[index])
    return inputs, rng_states


def _replay_segment(
    plan: _ReplayPlan, index: int, state: State, rng: dict, grad_loss, grad_state: list, grad_parameters: list
):
    """Runs segment ``index`` with grad and differentiates its loss and output state (weighted by their
    gradients) with respect to its input state and the parameters; adds the parameters' share to
    ``grad_parameters`` and returns the input state's."""
    state_in = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state)
    with torch.enable_grad(), restored_torch_rng(rng):
        new_state, loss, _ = plan.step(state_in, plan.segments[index])
    pairs = flowing([(loss, grad_loss), *zip(new_state, grad_state)])
    differentiable = [t for t in state_in if t.requires_grad]
    if not pairs:
        return [None] * len(state_in)
    outputs, grads = zip(*pairs)
    found = torch.autograd.grad(outputs, [*differentiable, *plan.parameters], grads, allow_unused=True)
    for position, grad in enumerate(found[len(differentiable) :]):
        if grad is None:
            continue
        held = grad_parameters[position]
        # the first is copied: autograd may hand back a tensor it also holds, which the sum must not change
        grad_parameters[position] = grad.clone() if held is None else held.add_(grad)
    found_state = iter(found[: len(differentiable)])
    return [next(found_state) if t.requires_grad else None for t in state_in]
