"""RecurrentMemoryModel: an unchanged Hugging Face backbone that reads a long input segment by segment,
carrying memory tokens from one segment to the next."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from .associative import AssociativeLayers, AssociativeState
from .backbones import ENCODER_TYPES, describe_backbone, run_decoder, run_encoder
from .config import ARMTConfig, RMTConfig
from .recurrence import run_segments
from .segments import segment_bounds
from .wavefront import run_wavefront

BACKBONE_DIR = "backbone"
WEIGHTS_NAME = "memory.safetensors"
IGNORE_INDEX = -100


@dataclass
class RMTOutput(ModelOutput):
    """Output of :class:`RecurrentMemoryModel`.

    Attributes:
        loss: decoders: mean next-token loss over every labelled token of every segment; encoders: the
            classification loss. None without labels.
        memory: the memory after the last segment, to pass back as ``memory=`` to continue a stream. RMT:
            the memory tokens ``(batch, num_mem_tokens, hidden)``, None when memory is off; ARMT: an
            :class:`AssociativeState` holding every layer's (A, z).
        logits: decoders: ``(batch, length, vocab)``, only with ``return_logits=True``; encoders: the
            classification logits, taken at each sample's last non-empty segment.
        num_segments: how many segments the input was cut into.
    """

    loss: torch.Tensor | None = None
    memory: torch.Tensor | AssociativeState | None = None
    logits: torch.Tensor | None = None
    num_segments: int | None = None


@dataclass
class _Segment:
    input_ids: torch.Tensor  # (batch, tokens)
    attention_mask: torch.Tensor  # (batch, tokens), 1 for real tokens
    targets: torch.Tensor | None  # decoders: already shifted next-token labels, (batch, tokens)
    return_logits: bool


class RecurrentMemoryModel(nn.Module):
    """Wraps a Hugging Face causal LM (OPT, GPT-2, Llama/Mistral/Qwen2, GPT-NeoX) or a BERT-family
    sequence classifier. Decoder segments are ``[read memory | segment | write memory]`` and the final
    hidden states at the write positions become the next segment's memory; encoder segments are
    ``[CLS] memory [SEP] segment [SEP]`` with memory read and written in place (``[CLS] segment [SEP]``
    without memory).

    With an :class:`ARMTConfig` (decoders only) every layer gets an associative memory: decoder segments are
    ``[segment | memory tokens]``, the memory tokens are the same learned embeddings every segment, and
    what is carried from segment to segment is each layer's associative state (see ``associative.py``)."""

    config_class = RMTConfig

    def __init__(self, backbone: nn.Module, config: RMTConfig):
        super().__init__()
        config.validate()
        self.backbone = backbone
        self.config = config
        self.spec = describe_backbone(backbone)
        self.associative = None
        if isinstance(config, ARMTConfig):
            self.associative = AssociativeLayers(backbone, self.spec.model_type, self._hidden_width(), config)
        self._check_fits_positions()
        if self.spec.kind == "encoder" and (config.cls_token_id is None or config.sep_token_id is None):
            raise ValueError(
                "encoder backbones need cls_token_id and sep_token_id in the RMTConfig: set them from your "
                "tokenizer, or load with RecurrentMemoryModel.from_backbone(path) where path has a tokenizer."
            )
        self.memory = None
        if config.num_mem_tokens > 0:
            embedding = backbone.get_input_embeddings().weight
            std = _full_tensor(embedding).float().std().item()
            init = torch.randn(config.num_mem_tokens, self.spec.hidden_size) * std
            self.memory = nn.Parameter(init.to(embedding.dtype))

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_backbone(cls, name_or_path: str | Path, config: RMTConfig, **backbone_kwargs) -> "RecurrentMemoryModel":
        """Loads a backbone with ``from_pretrained`` (a hub id or a local directory) and wraps it."""
        backbone_config = transformers.AutoConfig.from_pretrained(name_or_path)
        if backbone_config.model_type in ENCODER_TYPES:
            auto = transformers.AutoModelForSequenceClassification
            if config.cls_token_id is None or config.sep_token_id is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
                config.cls_token_id = tokenizer.cls_token_id if config.cls_token_id is None else config.cls_token_id
                config.sep_token_id = tokenizer.sep_token_id if config.sep_token_id is None else config.sep_token_id
        else:
            auto = transformers.AutoModelForCausalLM
        backbone = auto.from_pretrained(name_or_path, **backbone_kwargs)
        return cls(backbone, config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes ``rmt_config.json``, the memory weights (safetensors) and the backbone in its own format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        self.backbone.save_pretrained(directory / BACKBONE_DIR)
        own = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()
               if not name.startswith("backbone.")}
        save_file(own, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, **backbone_kwargs) -> "RecurrentMemoryModel":
        directory = Path(directory)
        config = RMTConfig.from_pretrained(directory)
        backbone_dir = directory / BACKBONE_DIR
        architectures = transformers.AutoConfig.from_pretrained(backbone_dir).architectures or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"{backbone_dir}/config.json names no known architecture; re-save the model.")
        try:
            backbone = getattr(transformers, architectures[0]).from_pretrained(backbone_dir, **backbone_kwargs)
        except SafetensorError as error:
            damaged = [path for path in sorted(backbone_dir.glob("*.safetensors")) if not _readable(path)]
            raise _damaged_weights(damaged[0] if damaged else backbone_dir, error) from error
        model = cls(backbone, config)
        try:
            own = load_file(str(directory / WEIGHTS_NAME))
        except SafetensorError as error:
            raise _damaged_weights(directory / WEIGHTS_NAME, error) from error
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [name for name in missing if not name.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match the config: missing {missing}, "
                             f"unexpected {unexpected}.")
        return model

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> RMTOutput:
        """Reads ``input_ids`` of any length segment by segment.

        Args:
            input_ids: ``(batch, length)`` token ids. Encoders take the text without special tokens.
            attention_mask: ``(batch, length)``, 0 at padding (either side). A sample whose text has ended
                (or not yet begun) keeps its memory unchanged through the segments it has no tokens in.
            labels: decoders: ``(batch, length)`` token ids, not shifted, ``-100`` where no loss is wanted
                (padding is ignored too); encoders: ``(batch,)`` class ids.
            memory: the memory to start from (``RMTOutput.memory`` of a previous call); default: learned.
            return_logits: decoders only: also return all logits (memory grows with the input length).
        """
        attention_mask = self._check_inputs(input_ids, attention_mask, labels, memory)
        if self.associative is not None and self.associative.layers_checkpointed():
            raise ValueError("the backbone's own activation checkpointing would recompute its layers outside the "
                             "ARMT segment step, without the associative state: disable it and set "
                             "backprop='checkpoint' or 'replay' in the ARMTConfig instead.")
        batch, length = input_ids.shape
        targets = self._next_token_targets(labels, attention_mask) if self.spec.kind == "decoder" else None
        segments = [
            _Segment(
                input_ids[:, start:end],
                attention_mask[:, start:end],
                None if targets is None else targets[:, start:end],
                return_logits,
            )
            for start, end in segment_bounds(length, self.config.segment_size, self.config.segment_alignment)
        ]
        state = self._initial_state(batch, memory)
        if self._runs_wavefront():
            loss_sum, state, extras = run_wavefront(self, state, segments)
        else:
            step = self._decoder_step if self.spec.kind == "decoder" else self._encoder_step
            loss_sum, state, extras = run_segments(step, state, segments, self.config.backprop,
                                                   self.config.bptt_depth)

        if self.associative is not None:
            final_memory = AssociativeState.from_tuple(state)
        else:
            final_memory = state[0] if self.memory is not None else None
        if self.spec.kind == "decoder":
            num_targets = int((targets != IGNORE_INDEX).sum()) if targets is not None else 0
            loss = loss_sum / num_targets if num_targets else None
            logits = torch.cat(extras, dim=1) if return_logits else None
        else:
            logits = state[-1]
            loss = None if labels is None else self._classification_loss(logits, labels)
        return RMTOutput(loss=loss, memory=final_memory, logits=logits, num_segments=len(segments))

    def _runs_wavefront(self) -> bool:
        return (self.associative is not None and self.config.execution == "wavefront"
                and not torch.is_grad_enabled())

    def _initial_state(self, batch: int, memory) -> tuple[torch.Tensor, ...]:
        if self.associative is not None:
            return self.associative.empty_state(batch, self._device()) if memory is None else memory.to_tuple()
        state = []
        if self.memory is not None:
            state.append(self.memory.unsqueeze(0).expand(batch, -1, -1) if memory is None else memory)
        if self.spec.kind == "encoder":
            num_labels = self.backbone.config.num_labels
            state.append(torch.zeros(batch, num_labels, device=self._device(), dtype=torch.float32))
        return tuple(state)

    @staticmethod
    def _next_token_targets(labels: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor | None:
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

    def _decoder_step(self, state, segment: _Segment):
        if self.associative is not None:
            return self._associative_step(state, segment)
        num_mem = self.config.num_mem_tokens
        tokens = self.backbone.get_input_embeddings()(segment.input_ids)
        ones = segment.attention_mask.new_ones(tokens.shape[0], num_mem)
        if num_mem:
            (memory,) = state
            memory = memory.to(tokens.dtype)
            embeds = torch.cat([memory, tokens, memory], dim=1)
            mask = torch.cat([ones, segment.attention_mask, ones], dim=1)
        else:
            embeds, mask = tokens, segment.attention_mask
        hidden, _ = run_decoder(self.backbone, embeds, _padding_mask(mask), _positions(mask))
        length = tokens.shape[1]
        token_hidden = hidden[:, num_mem : num_mem + length]
        loss, logits = self._lm_loss(token_hidden, segment.targets, segment.return_logits)
        new_state = ()
        if num_mem:
            # a copy, not a view: a view would keep the segment's whole hidden state alive in the chain
            written = hidden[:, num_mem + length :].clone()
            new_state = (_keep_if_empty(written, memory, segment.attention_mask),)
        return new_state, loss, logits

    def _associative_inputs(self, segment: _Segment):
        """ARMT's ``[segment | memory tokens]`` embeddings and mask."""
        tokens = self.backbone.get_input_embeddings()(segment.input_ids)
        batch = tokens.shape[0]
        memory = self.memory.unsqueeze(0).expand(batch, -1, -1).to(tokens.dtype)
        mask = torch.cat([segment.attention_mask, segment.attention_mask.new_ones(batch, memory.shape[1])], dim=1)
        return torch.cat([tokens, memory], dim=1), mask

    def _associative_step(self, state, segment: _Segment):
        embeds, mask = self._associative_inputs(segment)
        with self.associative.session(state, write_from_last=self.config.num_mem_tokens) as session:
            hidden, _ = run_decoder(self.backbone, embeds, _padding_mask(mask), _positions(mask))
        # under causal attention the tokens do not see the memory tokens after them
        loss, logits = self._lm_loss(hidden[:, : segment.input_ids.shape[1]], segment.targets, segment.return_logits)
        new_state = tuple(_keep_if_empty(new, old, segment.attention_mask)
                          for new, old in zip(session.new_state(), state))
        return new_state, loss, logits

    def _lm_loss(self, token_hidden: torch.Tensor, targets: torch.Tensor | None, return_logits: bool):
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

    def _encoder_step(self, state, segment: _Segment):
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
        logits, hidden = run_encoder(self.backbone, embeds, mask, _positions(mask))
        previous_logits = state[-1]
        new_state = (_keep_if_empty(logits.float(), previous_logits, segment.attention_mask),)
        if num_mem:
            written = hidden[:, 1 : 1 + num_mem].clone()
            new_state = (_keep_if_empty(written, memory, segment.attention_mask), *new_state)
        return new_state, logits.new_zeros(()), None

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.backbone.config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Continues ``input_ids`` (``(batch, length)``, no padding): the context segments build memory,
        then tokens are decoded from ``[memory | last segment]`` with the backbone's KV cache. When the text
        fills a segment, the segment's write memory is computed and decoding goes on in a fresh segment,
        exactly as ``forward`` would cut the whole text. Right-aligned segments are cut from the end of the
        text, so they are laid out for the full ``max_new_tokens``; a generation stopped early by
        ``eos_token_id`` keeps those borders. Returns context and new tokens.

        With ``do_sample``, tokens are drawn from the softmax of the logits divided by ``temperature``
        (> 0), restricted to the ``top_k`` (>= 1) most likely ones when given."""
        if self.spec.kind != "decoder":
            raise ValueError("generate needs a decoder backbone; encoders classify, call the model instead.")
        self._check_inputs(input_ids, None, None, memory)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is negative: pass 0 or more.")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature={temperature} is invalid: sampling needs a temperature greater than 0; "
                             "for the most likely tokens pass do_sample=False.")
        if do_sample and top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} is invalid: keep at least 1 token, or pass None to sample from all.")
        context = input_ids.shape[1]
        bounds = segment_bounds(context + max_new_tokens, self.config.segment_size, self.config.segment_alignment)
        start, end = next((start, end) for start, end in bounds if end >= context)  # holds the last context token
        if start > 0:
            memory = self(input_ids[:, :start], memory=memory).memory
        elif self.associative is not None and memory is None:
            memory = AssociativeState.from_tuple(self.associative.empty_state(input_ids.shape[0], self._device()))
        elif self.memory is not None and memory is None:
            memory = self.memory.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        decoder_class = _AssociativeSegmentDecoder if self.associative is not None else _SegmentDecoder
        decoder = decoder_class(self, memory, first_segment_size=end - start)
        logits = decoder.feed(input_ids[:, start:])
        generated = []
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for index in range(max_new_tokens):
            token = _pick(logits, do_sample, temperature, top_k)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            generated.append(token)
            if index + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = decoder.feed(token[:, None])
        return torch.cat([input_ids, *[t[:, None] for t in generated]], dim=1)

    # ------------------------------------------------------------------ checks
    def _check_fits_positions(self) -> None:
        num_mem = self.config.num_mem_tokens
        if self.associative is not None:
            extra = num_mem
        elif self.spec.kind == "decoder":
            extra = 2 * num_mem
        else:
            extra = num_mem + (3 if num_mem else 2)
        needed = self.config.segment_size + extra
        if needed > self.spec.max_positions:
            raise ValueError(
                f"a segment needs {needed} positions (segment_size={self.config.segment_size} plus {extra} for "
                f"memory{' and special tokens' if self.spec.kind == 'encoder' else ''}) but the "
                f"{self.spec.model_type} backbone has {self.spec.max_positions}: lower segment_size to at most "
                f"{self.spec.max_positions - extra}."
            )

    def _check_inputs(self, input_ids, attention_mask, labels, memory) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}: add a batch dimension.")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least one token.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}: give one mask value per token.")
        else:
            other = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:5].tolist()
            if other:
                raise ValueError(f"attention_mask holds values other than 0 and 1 ({', '.join(map(str, other))}): "
                                 "pass 1 for tokens and 0 for padding.")
        empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"samples {empty} have no tokens (their attention_mask is all zero): drop them.")
        if labels is not None:
            expected = input_ids.shape if self.spec.kind == "decoder" else input_ids.shape[:1]
            if labels.shape != expected:
                raise ValueError(f"labels have shape {tuple(labels.shape)} but must have {tuple(expected)} "
                                 f"({'one per token' if self.spec.kind == 'decoder' else 'one class per sample'}).")
        if memory is not None and self.associative is not None:
            expected = [tuple(t.shape) for t in self.associative.empty_state(input_ids.shape[0], "meta")]
            if not isinstance(memory, AssociativeState) or [tuple(t.shape) for t in memory.to_tuple()] != expected:
                raise ValueError("memory must be the AssociativeState returned by this ARMT for a batch of "
                                 f"{input_ids.shape[0]} samples.")
        elif memory is not None:
            if not isinstance(memory, torch.Tensor):
                raise ValueError(f"memory must be a tensor, the RMTOutput.memory of this model, but got "
                                 f"{type(memory).__name__}.")
            expected = (input_ids.shape[0], self.config.num_mem_tokens, self.spec.hidden_size)
            if self.memory is None or tuple(memory.shape) != expected:
                raise ValueError(f"memory has shape {tuple(memory.shape)} but this model's memory is {expected}: "
                                 "pass the memory returned by this model for the same batch.")
        return attention_mask

    def _hidden_width(self) -> int:
        """Width of the residual stream inside the layers (OPT-350m projects its embeddings in)."""
        return getattr(self.backbone.config, "hidden_size", self.spec.hidden_size)

    def _device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device


class _SegmentDecoder:
    """Incremental decoding inside segments: keeps the backbone's KV cache for the current segment and
    rolls over to a new segment (new memory, fresh cache) when the current one is full. The first segment
    may be short (right alignment); the later ones hold ``segment_size`` tokens."""

    def __init__(self, model: RecurrentMemoryModel, memory, first_segment_size: int):
        self.model = model
        self.memory = memory
        self.segment_size = first_segment_size
        self.start_segment()

    def start_segment(self) -> None:
        self.cache, self.position, self.filled = None, 0, 0
        if self.memory is not None:
            self._run(self.memory.to(self.model.backbone.dtype))

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens of the current segment (rolling over if full); returns the last position's logits."""
        if self.filled == self.segment_size:
            self._close_segment()
            self.segment_size = self.model.config.segment_size
        embeds = self.model.backbone.get_input_embeddings()(tokens)
        hidden = self._run(embeds)
        self.filled += tokens.shape[1]
        return self.model.backbone.get_output_embeddings()(hidden[:, -1])

    def _close_segment(self) -> None:
        if self.memory is not None:
            self.memory = self._run(self.memory.to(self.model.backbone.dtype))
        self.start_segment()

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        batch, length = embeds.shape[:2]
        positions = torch.arange(self.position, self.position + length, device=embeds.device).expand(batch, -1)
        hidden, self.cache = run_decoder(self.model.backbone, embeds, None, positions, self.cache, use_cache=True)
        self.position += length
        return hidden


class _AssociativeSegmentDecoder(_SegmentDecoder):
    """ARMT decoding: tokens read the associative state, which stays fixed inside a segment; when a segment
    is full its memory tokens are run through the cache, each layer writes, and a fresh segment begins."""

    def start_segment(self) -> None:
        self.cache, self.position, self.filled = None, 0, 0

    def _close_segment(self) -> None:
        memory = self.model.memory.unsqueeze(0).expand(self.memory.matrices[0].shape[0], -1, -1)
        self._run(memory.to(self.model.backbone.dtype), write=True)
        self.start_segment()

    def _run(self, embeds: torch.Tensor, write: bool = False) -> torch.Tensor:
        state = self.memory.to_tuple()
        with self.model.associative.session(state, write_from_last=embeds.shape[1] if write else 0) as session:
            hidden = super()._run(embeds)
        if write:
            self.memory = AssociativeState.from_tuple(session.new_state())
        return hidden


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions restart at 0 every segment and skip padding, so a padded sample is placed exactly as the
    same sample alone."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _padding_mask(mask: torch.Tensor) -> torch.Tensor | None:
    # None lets attention take its causal fast path when nothing is padded
    return None if bool(mask.all()) else mask


def _keep_if_empty(new: torch.Tensor, old: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Samples with no token in this segment keep their previous value."""
    has_tokens = token_mask.any(dim=1)
    if bool(has_tokens.all()):
        return new
    shape = (-1,) + (1,) * (new.dim() - 1)
    return torch.where(has_tokens.view(shape), new, old.to(new.dtype))


def _readable(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except SafetensorError:
        return False


def _damaged_weights(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is damaged ({error}), e.g. truncated by an interrupted copy: copy or save the "
                      "model again.")


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter, also when DeepSpeed ZeRO-3 has partitioned it away from this rank."""
    if hasattr(param, "ds_id") and param.numel() == 0:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param
