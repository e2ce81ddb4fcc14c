"""Generation: decoding token by token inside segments with the backbone's KV cache."""

from __future__ import annotations

import torch

from .backbones import run_decoder
from .segments import check_inputs, segment_bounds


class SegmentDecoder:
    """Incremental decoding inside segments: keeps the backbone's KV cache for the current segment and
    rolls over to a new segment (new memory, fresh cache) when the current one is full. The first segment
    may be short (right alignment); the later ones hold ``segment_size`` tokens. The cache holds the step's
    ``layout``: its read positions run when a segment starts, its write positions when it closes."""

    def __init__(self, step, state: tuple, first_segment_size: int):
        self.step, self.backbone, self.segment_size = step, step.backbone, first_segment_size
        self.state = state  # what the segment reads, as the step carries it
        self.start_segment()

    def start_segment(self) -> None:
        self.cache, self.position, self.filled = None, 0, 0
        if self.step.layout.read:
            self.run(self.state[0].to(self.backbone.dtype))

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens of the current segment (rolling over if full); returns the last position's logits."""
        if self.filled == self.segment_size:
            self.close_segment()
            self.segment_size = self.step.config.segment_size
        hidden = self.run(self.backbone.get_input_embeddings()(tokens))
        self.filled += tokens.shape[1]
        return self.backbone.get_output_embeddings()(hidden[:, -1])

    def close_segment(self) -> None:
        if self.step.layout.write:
            (read,) = self.state
            self.state = (self.step.next_memory(read, self.run(read.to(self.backbone.dtype))),)
        self.start_segment()

    def run(self, embeds: torch.Tensor) -> torch.Tensor:
        batch, length = embeds.shape[:2]
        positions = torch.arange(self.position, self.position + length, device=embeds.device).expand(batch, -1)
        hidden, self.cache = run_decoder(self.backbone, embeds, None, positions, self.cache, use_cache=True)
        self.position += length
        return hidden


class AssociativeSegmentDecoder(SegmentDecoder):
    """ARMT decoding: tokens read the associative state, which stays fixed inside a segment; when a segment
    is full its memory tokens are run through the cache, each layer writes, and a fresh segment begins."""

    def close_segment(self) -> None:
        self.run(self.step.memory_tokens(self.state[0].shape[0]).to(self.backbone.dtype), write=True)
        self.start_segment()

    def run(self, embeds: torch.Tensor, write: bool = False) -> torch.Tensor:
        with self.step.associative.session(self.state, write=write) as session:
            hidden = super().run(embeds)
        if write:
            self.state = session.new_state()
        return hidden


def pick_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)


class GenerationMixin:
    """``generate`` for :class:`RecurrentMemoryModel`, which brings ``forward``, ``step`` and ``config``."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        memory=None,
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
        check_inputs(input_ids, None, vocab_size=self.backbone.get_input_embeddings().num_embeddings)
        state = self.step.initial_state(input_ids.shape[0], memory)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is negative: pass 0 or more.")
        if do_sample and not temperature > 0:
            raise ValueError(
                f"temperature={temperature} is invalid: sampling needs a temperature greater than 0; "
                "for the most likely tokens pass do_sample=False."
            )
        if do_sample and top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} is invalid: keep at least 1 token, or pass None to sample from all.")
        context = input_ids.shape[1]
        bounds = segment_bounds(context + max_new_tokens, self.config.segment_size, self.config.segment_alignment)
        start, end = next((start, end) for start, end in bounds if end >= context)  # holds the last context token
        if start > 0:
            state = self.step.initial_state(input_ids.shape[0], self(input_ids[:, :start], memory=memory).memory)
        decoder = self.step.segment_decoder(state, first_segment_size=end - start)
        logits = decoder.feed(input_ids[:, start:])
        generated = []
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for index in range(max_new_tokens):
            token = pick_token(logits, do_sample, temperature, top_k)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            generated.append(token)
            if index + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = decoder.feed(token[:, None])
        return torch.cat([input_ids, *[t[:, None] for t in generated]], dim=1)
