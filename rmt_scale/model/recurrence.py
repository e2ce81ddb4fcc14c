"""Backpropagation through a chain of segments.

A *step* maps ``(state, segment) -> (new_state, loss_sum, extra)``: ``state`` is a tuple of tensors carried
between segments (memory tokens, associative matrices, ...), ``loss_sum`` a scalar summed over the segment's
labelled tokens and ``extra`` whatever the caller wants back per segment (logits, or None). The three
drivers below compute the same value and the same gradients; they differ in what they keep alive:

- ``bptt``: every segment's activations (fast; memory grows with the number of segments);
- ``checkpoint``: each segment's input state only, recomputing the segment in backward;
- ``replay``: memory replay backprop. Forward runs without grad and keeps each segment's input state;
  backward recomputes segments last to first, handing the state gradient back one segment at a time.

Truncated BPTT (``bptt_depth=k``) cuts the state gradient on all but the last ``k`` transitions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..rng import restored_torch_rng, torch_rng_state

State = tuple[torch.Tensor, ...]
Step = Callable[[State, Any], tuple[State, torch.Tensor, Any]]


def keeps_gradient(index: int, num_segments: int, bptt_depth: int) -> bool:
    """Whether the state read by segment ``index`` still carries gradient to the segment before it."""
    return bptt_depth < 0 or index >= num_segments - bptt_depth


def backpropagate(pairs) -> None:
    """Backward from each ``(output, gradient)`` pair whose gradient is given and whose output needs one: a
    recomputed segment handing on the gradients that came back to it (replay, pipeline stages)."""
    pairs = [(out, grad) for out, grad in pairs if grad is not None and out.requires_grad]
    if pairs:
        torch.autograd.backward(*zip(*pairs))


def run_segments(
    step: Step, state: State, segments: Sequence[Any], mode: str, bptt_depth: int = -1
) -> tuple[torch.Tensor, State, list[Any]]:
    """Runs ``step`` over ``segments``; returns the summed loss, the final state and each segment's extra."""
    if not torch.is_grad_enabled():
        mode = "bptt"  # nothing to backpropagate: the plain loop already keeps nothing
    if mode == "replay":
        return _run_replay(step, state, segments, bptt_depth)
    total = None
    extras = []
    for index, segment in enumerate(segments):
        if index > 0 and not keeps_gradient(index, len(segments), bptt_depth):
            state = tuple(t.detach() for t in state)
        if mode == "checkpoint":
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


def _run_replay(step: Step, state: State, segments: Sequence[Any], bptt_depth: int):
    extras: list[Any] = []
    # The parameters are not inputs of the Function, so without this anchor a stateless chain (no memory
    # tokens) would return a loss that autograd considers constant.
    anchor = torch.zeros((), requires_grad=True)
    loss, *final_state = _MemoryReplay.apply(step, segments, bptt_depth, extras, anchor, *state)
    return loss, tuple(final_state), extras


class _MemoryReplay(torch.autograd.Function):
    """Memory replay backprop. Parameter gradients accumulate into ``.grad`` during the replay, so this
    mode supports ``loss.backward()`` (not ``torch.autograd.grad`` w.r.t. parameters)."""

    @staticmethod
    def forward(ctx, step, segments, bptt_depth, extras, anchor, *state):
        ctx.step, ctx.segments, ctx.bptt_depth = step, segments, bptt_depth
        inputs, rng_states = [], []
        total = None
        with torch.no_grad():
            for segment in segments:
                inputs.append(state)
                rng_states.append(torch_rng_state())
                state, loss, extra = step(state, segment)
                total = loss if total is None else total + loss
                extras.append(extra)
        ctx.inputs, ctx.rng_states = inputs, rng_states
        return (total, *state)

    @staticmethod
    def backward(ctx, grad_loss, *grad_state):
        num_segments = len(ctx.segments)
        grad_state = list(grad_state)
        for index in reversed(range(num_segments)):
            state_in = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in ctx.inputs[index])
            with torch.enable_grad(), restored_torch_rng(ctx.rng_states[index]):
                new_state, loss, _ = ctx.step(state_in, ctx.segments[index])
            backpropagate([(loss, grad_loss), *zip(new_state, grad_state)])
            grad_state = [t.grad if t.requires_grad else None for t in state_in]
            ctx.inputs[index] = None  # free the stored state as soon as it is replayed
            if index > 0 and not keeps_gradient(index, num_segments, ctx.bptt_depth):
                # earlier segments are still replayed: their own losses give parameter gradients
                grad_state = [None] * len(grad_state)
        return (None, None, None, None, None, *grad_state)
