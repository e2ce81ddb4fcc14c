"""What one pipeline stage computes for one segment.

A decoder's layers are split over P stages. Stage 0 also lays the segment out (embeddings, memory tokens),
the last stage also applies the final norm and the LM head and sums the segment's loss. What a stage
computes for a segment is a function of

- ``received``: what the stage before sent. For stage 0 that is, in RMT, the memory the last stage wrote
  for the segment before (nothing for the first segment, whose memory is the learned one);
- ``state``: what the stage itself carried from the segment before (ARMT: its layers' (A, z));

and it returns ``sent`` (to the next stage; the last stage sends RMT's written memory back to stage 0),
its new ``state`` and, on the last stage, the segment's summed loss. A stage runs the one-process step's own
code (its ``inputs`` and ``finish``, ARMT's ``AssociativeCell``), so a pipeline gives the gradients of the
one-process model.

RMT's read memory travels down the pipe with the hidden states: the last stage needs it to keep the memory
of samples that have no token in the segment (padded batches), as the one-process step does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model import RecurrentMemoryModel
from ..model.associative import AssociativeCell, flat_state, layer_states
from ..model.backbones import decoder_final_modules, decoder_layers, layer_inputs, run_layer
from ..model.segments import Segment, keep_if_empty, padding_mask, positions


def split_layers(num_layers: int, num_stages: int, head_cost: float = 0.0) -> list[range]:
    """Contiguous layer ranges, one per stage, of at least one layer each, that minimise the largest stage's
    cost: a layer costs 1, and the last stage also pays ``head_cost`` layers for the LM head and loss.
    Ties go to the split that puts more layers first."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"cannot split {num_layers} decoder layers over {num_stages} pipeline stages: use at "
            f"most {num_layers} stages (one layer each at least)."
        )
    # best[s][n]: the smallest largest cost of splitting the last n layers over the last s stages
    best = {(1, n): n + head_cost for n in range(1, num_layers + 1)}
    first = {}
    for stages in range(2, num_stages + 1):
        for n in range(stages, num_layers + 1):
            options = [(max(k, best[stages - 1, n - k]), -k) for k in range(1, n - stages + 2)]
            cost, minus_k = min(options)
            best[stages, n], first[stages, n] = cost, -minus_k
    bounds, start, remaining = [], 0, num_layers
    for stages in range(num_stages, 1, -1):
        size = first[stages, remaining]
        bounds.append(range(start, start + size))
        start, remaining = start + size, remaining - size
    return bounds + [range(start, num_layers)]


def head_cost_in_layers(model: RecurrentMemoryModel) -> float:
    """The LM head's cost per token relative to a decoder layer's (their parameter counts): what
    :func:`split_layers` should charge the last stage when every token has a label (language modelling)."""
    layers = decoder_layers(model.backbone)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    return sum(p.numel() for p in model.backbone.get_output_embeddings().parameters()) / per_layer


@dataclass
class StageOutput:
    sent: tuple[torch.Tensor, ...]
    state: tuple[torch.Tensor, ...]
    loss: torch.Tensor | None  # summed over the segment's labelled tokens; last stage only


class PipelineStage(nn.Module):
    """Stage ``stage`` of ``num_stages`` of an RMT or ARMT decoder (layers split by :func:`split_layers` with
    ``head_cost``). The layers of other stages (and their
    associative memories) are replaced by ``nn.Identity`` in ``model``, which the stage takes over, so a rank
    holds only its share of the layers (embeddings, final norm and head stay on every rank: the layer
    arguments are computed by the backbone's own code before its first layer)."""

    def __init__(self, model: RecurrentMemoryModel, stage: int, num_stages: int, head_cost: float = 0.0):
        super().__init__()
        if model.spec.kind != "decoder":
            raise ValueError(
                "pipeline stages split decoder backbones (OPT, GPT-2, Llama family, GPT-NeoX); "
                f"{model.spec.model_type} is an encoder: train it with a ZeRO config instead."
            )
        self.model, self.stage, self.num_stages = model, stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.associative = model.associative is not None
        self.num_mem = model.config.num_mem_tokens
        # RMT's memory goes down the pipe with the hidden states, and from the last stage back to stage 0
        self.memory_turns_around = not self.associative and self.num_mem > 0
        layers = decoder_layers(model.backbone)
        self.layer_ids = split_layers(len(layers), num_stages, head_cost)[stage]
        for index in range(len(layers)):
            if index not in self.layer_ids:
                layers[index] = nn.Identity()
                if self.associative:
                    model.associative.memories[index] = nn.Identity()
        self.layers = [layers[i] for i in self.layer_ids]
        self.cells = (
            [AssociativeCell(layers[i], model.associative.memories[i], self.num_mem) for i in self.layer_ids]
            if self.associative
            else []
        )
        self.final_modules = decoder_final_modules(model.backbone)
        self.head = model.backbone.get_output_embeddings()
        self.tied_head = self.head.weight is model.backbone.get_input_embeddings().weight

    # ------------------------------------------------------------------ parameters
    def owned_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters this stage computes with, by their name in the whole model: its layers
        (and their associative memories); on stage 0 also the input part (embeddings, memory tokens); on the
        last stage the final norm, the head and RMT's memory gate. A head tied to the input embeddings is held
        by both ends (see :meth:`tied_parameters`)."""
        layer_ids = {id(p) for module in [*self.layers, *self.cells] for p in module.parameters()}
        gate = [self.model.memory_gate] if self.model.memory_gate is not None else []
        final_ids = {id(p) for module in [*self.final_modules, *gate] for p in module.parameters()}
        head_ids = {id(p) for p in self.head.parameters()}
        owned = {}
        for name, param in self.model.named_parameters():
            if id(param) in layer_ids:
                keep = True
            elif id(param) in final_ids:
                keep = self.is_last
            elif id(param) in head_ids:
                keep = self.is_last or (self.is_first and self.tied_head)
            else:
                keep = self.is_first
            if keep and param.requires_grad:
                owned[name] = param
        return owned

    def tied_parameters(self) -> list[nn.Parameter]:
        """Parameters held (and trained) by both the first and the last stage: their gradients are summed
        between the two after each step, so both copies take the same update."""
        if self.num_stages == 1 or not self.tied_head or not (self.is_first or self.is_last):
            return []
        return [self.head.weight]

    # ------------------------------------------------------------------ shapes
    def received_shapes(self, segment: Segment, index: int) -> list[tuple[int, ...]]:
        """Shapes of what this stage receives for ``segment`` (the ``index``-th of the sample)."""
        batch, length = segment.input_ids.shape
        width = self.model.spec.hidden_size
        memory = [(batch, self.num_mem, width)] if self.memory_turns_around else []
        if self.is_first:
            return memory if index > 0 else []
        return [(batch, self.model.step.layout.length(length), self.model.backbone.config.hidden_size), *memory]

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """ARMT: the empty (A, z) of this stage's layers; RMT carries nothing."""
        return flat_state(cell.memory.empty_state(batch, self.model.backbone.device) for cell in self.cells)

    # ------------------------------------------------------------------ the computation
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.backbone.get_input_embeddings()(input_ids)

    @property
    def embeddings_train(self) -> bool:
        return self.model.backbone.get_input_embeddings().weight.requires_grad

    def forward(
        self,
        segment: Segment,
        received: tuple[torch.Tensor, ...],
        state: tuple[torch.Tensor, ...],
        tokens: torch.Tensor | None = None,
    ) -> StageOutput:
        """``tokens``: stage 0's :meth:`embed_tokens` of the segment, when the caller looked them up itself
        (to backpropagate into the embedding table once for many segments); looked up here when None."""
        step = self.model.step
        if self.is_first:
            tokens = self.embed_tokens(segment.input_ids) if tokens is None else tokens
            # RMT reads what the last stage sent, the learned memory in the first segment; ARMT the memory tokens
            memory = received[0] if received else step.memory_tokens(tokens.shape[0])
            memory = None if memory is None else memory.to(tokens.dtype)
            embeds, mask = step.inputs(segment, memory, tokens)
            read_memory = None if self.associative else memory
            hidden, args, kwargs = layer_inputs(self.model.backbone, embeds, padding_mask(mask), positions(mask))
        else:
            hidden, *rest = received
            read_memory = rest[0] if rest else None
            mask = step.layout.mask(segment.attention_mask)
            with torch.no_grad():  # only the layer arguments (masks, rotary embeddings) are wanted
                zeros = hidden.new_zeros(hidden.shape[0], hidden.shape[1], self.model.spec.hidden_size)
                _, args, kwargs = layer_inputs(self.model.backbone, zeros, padding_mask(mask), positions(mask))
        new_state = []
        if self.associative:
            for cell, (matrix, normaliser) in zip(self.cells, layer_states(state)):
                hidden, *written = cell(hidden, matrix, normaliser, args, kwargs)
                new_state += [
                    keep_if_empty(new, old, segment.attention_mask) for new, old in zip(written, (matrix, normaliser))
                ]
        else:
            for layer in self.layers:
                hidden = run_layer(layer, hidden, args, kwargs)
        if not self.is_last:
            carried = () if read_memory is None else (read_memory,)
            return StageOutput((hidden, *carried), tuple(new_state), None)
        for module in self.final_modules:
            hidden = module(hidden)
        sent, loss, _ = step.finish(hidden, segment, read_memory)  # the pipeline's segments return no logits
        return StageOutput(sent, tuple(new_state), loss)
