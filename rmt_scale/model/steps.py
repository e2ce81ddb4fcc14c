"""One segment step per model variant: it lays a segment out, runs it and carries the state on (a ``Step`` of
``recurrence.py``); it builds the initial state, the model's outputs and the segment decoder for generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .associative import AssociativeLayers, AssociativeState
from .backbones import BackboneSpec, decoder_layers, run_decoder, run_encoder
from .config import RMTConfig
from .gate import MemoryGate
from .generation import AssociativeSegmentDecoder, SegmentDecoder
from .recurrence import State, run_segments
from .segments import IGNORE_INDEX, Segment, SegmentLayout, has_labels, keep_if_empty, padding_mask, positions
from .wavefront import run_wavefront


class MemoryTokenStep:
    """What the RMT variants share: memory tokens, learned or passed in, carried from segment to segment."""

    extras = "memory"  # what takes positions besides the segment, for the error message
    # what replay and sublinear backprop's Function takes in place of the parameters (run_segments'
    # parameter_inputs); set by a parallel engine that partitions them (ZeRO-3)
    replay_parameter_inputs = None

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        config: RMTConfig,
        memory: nn.Parameter | None,
        gate: MemoryGate | None = None,
    ):
        self.backbone, self.spec, self.config, self.memory, self.gate = backbone, spec, config, memory, gate

    @staticmethod
    def state_numel(config: RMTConfig, hidden_size: int, num_layers: int) -> int:
        """Numbers in one sample's state between two segments: the memory tokens."""
        return config.num_mem_tokens * hidden_size

    def memory_tokens(self, batch: int) -> torch.Tensor | None:
        """The learned memory embeddings ``(batch, num_mem, hidden)``; None without memory."""
        return None if self.memory is None else self.memory.unsqueeze(0).expand(batch, -1, -1)

    def initial_state(self, batch: int, memory=None) -> State:
        """The learned memory, or ``memory`` (a previous ``RMTOutput.memory``) after checking it fits."""
        if memory is None:
            return () if self.memory is None else (self.memory_tokens(batch),)
        if not isinstance(memory, torch.Tensor):
            raise ValueError(
                f"memory must be a tensor, the RMTOutput.memory of this model, but got {type(memory).__name__}."
            )
        expected = (batch, self.config.num_mem_tokens, self.spec.hidden_size)
        if self.memory is None or tuple(memory.shape) != expected:
            raise ValueError(
                f"memory has shape {tuple(memory.shape)} but this model's memory is {expected}: "
                "pass the memory returned by this model for the same batch."
            )
        return (memory,)

    def final_memory(self, state: State):
        return state[0] if self.memory is not None else None

    def next_memory(
        self, read: torch.Tensor, written: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The memory the next segment reads: what this one wrote, through the gate when there is one; with
        ``attention_mask``, samples whose segment is empty keep the memory they read."""
        if self.gate is not None:
            written = self.gate(read, written)
        return written if attention_mask is None else keep_if_empty(written, read, attention_mask)

    def run(self, state: State, segments: list[Segment]):
        config = self.config
        # with every transition in the gradient, every segment is visited anyway: no need to look at the labels
        labelled = None if config.bptt_depth < 0 else [has_labels(segment) for segment in segments]
        return run_segments(
            self,
            state,
            segments,
            config.backprop,
            config.bptt_depth,
            labelled=labelled,
            keep_every=config.state_keep_every,
            offload=config.state_offload,
            offload_dir=config.state_offload_dir,
            parameters=self.trainable_parameters(),
            parameter_inputs=self.replay_parameter_inputs,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a segment uses that take a gradient: the backbone's, the memory's and the gate's (and
        the associative layers' of an ARMT), once each."""
        modules = [self.backbone, self.gate, getattr(self, "associative", None)]
        found = [p for module in modules if module is not None for p in module.parameters()]
        found += [] if self.memory is None else [self.memory]
        return [p for p in dict.fromkeys(found) if p.requires_grad]


class DecoderStep(MemoryTokenStep):
    """RMT decoder: ``[read memory | segment | write memory]``; the hidden states at the write positions
    become the next segment's memory."""

    @staticmethod
    def segment_layout(config: RMTConfig) -> SegmentLayout:
        return SegmentLayout(read=config.num_mem_tokens, write=config.num_mem_tokens)

    @property
    def layout(self) -> SegmentLayout:
        return self.segment_layout(self.config)

    @classmethod
    def extra_positions(cls, config: RMTConfig) -> int:
        """Positions a segment's layout takes besides its tokens (checked against the backbone before it is built)."""
        return cls.segment_layout(config).length(0)

    def targets(self, labels: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Labels shifted once over the whole input, so every segment's last token predicts the next
        segment's first token, exactly as the backbone's own loss on the unsegmented input. Padding is
        neither a target nor a predictor: the last position of left padding would otherwise predict the
        first token, which nothing predicts when the sample is alone."""
        if labels is None:
            return None
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
        targets[attention_mask == 0] = IGNORE_INDEX
        return targets

    def inputs(
        self, segment: Segment, memory: torch.Tensor | None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment laid out (:attr:`layout`) around ``memory``: its input embeddings and attention mask
        (``tokens``: the segment's token embeddings, when the caller has looked them up)."""
        if tokens is None:
            tokens = self.backbone.get_input_embeddings()(segment.input_ids)
        return self.layout.embeds(tokens, memory), self.layout.mask(segment.attention_mask)

    def __call__(self, state: State, segment: Segment):
        tokens = self.backbone.get_input_embeddings()(segment.input_ids)
        read = state[0].to(tokens.dtype) if state else None
        embeds, mask = self.inputs(segment, read, tokens)
        hidden, _ = run_decoder(self.backbone, embeds, padding_mask(mask), positions(mask))
        return self.finish(hidden, segment, read)

    def finish(self, hidden: torch.Tensor, segment: Segment, read: torch.Tensor | None = None):
        """``(new_state, loss, logits)`` from the segment's final hidden states: RMT's next memory (from ``read``
        and the write positions; none without memory), the summed loss and the logits with return_logits."""
        loss, logits = self.lm_loss(self.layout.token_outputs(hidden), segment.targets, segment.return_logits)
        if read is None:
            return (), loss, logits
        return (self.next_memory(read, self.layout.written(hidden), segment.attention_mask),), loss, logits

    def lm_loss(self, token_hidden: torch.Tensor, targets: torch.Tensor | None, return_logits: bool):
        """Summed next-token loss of a segment's tokens, and their logits with ``return_logits``."""
        head = self.backbone.get_output_embeddings()
        if return_logits:
            logits = head(token_hidden)
            if targets is None:
                return token_hidden.new_zeros(()), logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            return loss, logits
        if targets is None:
            return token_hidden.new_zeros(()), None
        # the LM head runs only where there is a label: for question answering that is a handful of tokens
        selected = targets != IGNORE_INDEX
        if not selected.any():
            return token_hidden.new_zeros(()), None
        logits = head(token_hidden[selected])
        return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), None

    def outputs(self, state: State, loss_sum, logits: list, labels, targets):
        """``(loss, memory, logits)``: the mean loss over every labelled token (zero when every label is -100;
        None without labels); logits with return_logits."""
        if targets is None:
            loss = None
        elif num_targets := int((targets != IGNORE_INDEX).sum()):
            loss = loss_sum / num_targets
        else:
            loss = no_targets_loss(loss_sum, state)
        return loss, self.final_memory(state), None if logits[0] is None else torch.cat(logits, dim=1)

    def segment_decoder(self, state: State, first_segment_size: int) -> SegmentDecoder:
        return SegmentDecoder(self, state, first_segment_size)


def no_targets_loss(loss_sum: torch.Tensor, state: State) -> torch.Tensor:
    """The loss of labels that are all -100: zero, yet connected to the graph through the final memory, so that
    ``loss.backward()`` gives zero gradients (and every rank of a data-parallel step reduces them). A model
    without memory has nothing to connect through: its zero requires grad and gives no gradient."""
    zero = loss_sum.float() * 0
    for tensor in state:
        if tensor.requires_grad:
            zero = zero + tensor.float().sum() * 0
    if torch.is_grad_enabled() and not zero.requires_grad:
        zero.requires_grad_()
    return zero


class EncoderStep(MemoryTokenStep):
    """RMT encoder: ``[CLS] memory [SEP] segment [SEP]``, memory read and written in place (``[CLS] segment
    [SEP]`` without memory). The state ends with the logits of each sample's last non-empty segment."""

    extras = "memory and special tokens"

    @staticmethod
    def extra_positions(config: RMTConfig) -> int:
        return config.num_mem_tokens + (3 if config.num_mem_tokens else 2)

    def initial_state(self, batch: int, memory=None) -> State:
        logits = torch.zeros(batch, self.backbone.config.num_labels, device=self.backbone.device, dtype=torch.float32)
        return (*super().initial_state(batch, memory), logits)

    def targets(self, labels: torch.Tensor | None, attention_mask: torch.Tensor) -> None:
        return None  # the labels are the classes, used as they are by `outputs`

    def __call__(self, state: State, segment: Segment):
        num_mem = self.config.num_mem_tokens
        batch = segment.input_ids.shape[0]
        embed = self.backbone.get_input_embeddings()
        special = torch.tensor([self.config.cls_token_id, self.config.sep_token_id], device=segment.input_ids.device)
        cls, sep = embed(special).unsqueeze(0).expand(batch, -1, -1).unbind(1)
        tokens = embed(segment.input_ids)
        # without memory the frame is the plain [CLS] text [SEP] the backbone was trained on
        head = [cls[:, None]]
        if num_mem:
            memory = state[0].to(tokens.dtype)
            head += [memory, sep[:, None]]
        embeds = torch.cat([*head, tokens, sep[:, None]], dim=1)
        head_size = sum(part.shape[1] for part in head)
        ones = segment.attention_mask.new_ones(batch, head_size + 1)
        mask = torch.cat([ones[:, :head_size], segment.attention_mask, ones[:, head_size:]], dim=1)
        logits, hidden = run_encoder(self.backbone, embeds, mask, positions(mask))
        new_state = (keep_if_empty(logits.float(), state[-1], segment.attention_mask),)
        if num_mem:
            written = hidden[:, 1 : 1 + num_mem].clone()
            new_state = (self.next_memory(memory, written, segment.attention_mask), *new_state)
        return new_state, logits.new_zeros(()), None

    def outputs(self, state: State, loss_sum, logits: list, labels, targets):
        """``(loss, memory, logits)`` of the model: the classification at each sample's last segment."""
        logits = state[-1]
        if labels is None:
            loss = None
        elif self.backbone.config.num_labels == 1:
            loss = F.mse_loss(logits.squeeze(-1), labels.float())
        else:
            loss = F.cross_entropy(logits, labels)
        return loss, self.final_memory(state), logits


class AssociativeStep(DecoderStep):
    """ARMT decoder: ``[segment | memory]``, the memory tokens being the same learned embeddings every
    segment. The state is each layer's associative (A, z), flat, read and written by the layer hooks."""

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        config: RMTConfig,
        memory: nn.Parameter,
        associative: AssociativeLayers,
    ):
        super().__init__(backbone, spec, config, memory)
        self.associative = associative

    @staticmethod
    def segment_layout(config: RMTConfig) -> SegmentLayout:
        return SegmentLayout(read=0, write=config.num_mem_tokens)

    @staticmethod
    def state_numel(config: RMTConfig, hidden_size: int, num_layers: int) -> int:
        """Every layer's float32 (A, z): ``features x hidden_size`` and ``heads x features``."""
        features = 2 * config.dpfp_nu * config.d_mem
        return num_layers * features * (hidden_size + config.num_heads)

    def initial_state(self, batch: int, memory=None) -> State:
        if memory is None:
            return self.associative.empty_state(batch, self.backbone.device)
        expected = [tuple(t.shape) for t in self.associative.empty_state(batch, "meta")]
        if not isinstance(memory, AssociativeState) or [tuple(t.shape) for t in memory.to_tuple()] != expected:
            raise ValueError(
                f"memory must be the AssociativeState returned by this ARMT for a batch of {batch} samples."
            )
        return memory.to_tuple()

    def final_memory(self, state: State) -> AssociativeState:
        return AssociativeState.from_tuple(state)

    def run(self, state: State, segments: list[Segment]):
        if any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(self.backbone)):
            raise ValueError(
                "the backbone's own activation checkpointing would recompute its layers outside the "
                "ARMT segment step, without the associative state: disable it and set "
                "backprop='checkpoint' or 'replay' in the ARMTConfig instead."
            )
        if self.config.execution == "wavefront" and not torch.is_grad_enabled():
            return run_wavefront(self, state, segments)
        return super().run(state, segments)

    def __call__(self, state: State, segment: Segment):
        embeds, mask = self.inputs(segment, self.memory_tokens(segment.input_ids.shape[0]))
        with self.associative.session(state, write=True) as session:
            hidden, _ = run_decoder(self.backbone, embeds, padding_mask(mask), positions(mask))
        # under causal attention the tokens do not see the memory tokens after them
        _, loss, logits = self.finish(hidden, segment)
        new_state = tuple(
            keep_if_empty(new, old, segment.attention_mask) for new, old in zip(session.new_state(), state)
        )
        return new_state, loss, logits

    def segment_decoder(self, state: State, first_segment_size: int) -> AssociativeSegmentDecoder:
        return AssociativeSegmentDecoder(self, state, first_segment_size)
