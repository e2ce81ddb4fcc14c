"""Cutting a batch into segments, and laying a segment out for the backbone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value that no loss counts


@dataclass
class Segment:
    input_ids: torch.Tensor  # (batch, tokens)
    attention_mask: torch.Tensor  # (batch, tokens), 1 for real tokens
    targets: torch.Tensor | None  # decoders: already shifted next-token labels, (batch, tokens)
    return_logits: bool


def has_labels(segment: Segment) -> bool:
    """Whether a segment has a token that its loss counts."""
    return segment.targets is not None and bool((segment.targets != IGNORE_INDEX).any())


@dataclass(frozen=True)
class SegmentLayout:
    """A decoder's segment: ``read`` memory positions before its tokens, ``write`` ones after them, all holding
    the memory embeddings. RMT: ``[read memory | tokens | write memory]``, the outputs at the write positions
    are the next memory; ARMT: ``[tokens | memory tokens]``, which each layer writes into its (A, z)."""

    read: int
    write: int

    def length(self, num_tokens: int) -> int:
        return self.read + num_tokens + self.write

    def embeds(self, tokens: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """``tokens`` ``(batch, length, hidden)`` with ``memory`` ``(batch, num_mem, hidden)`` around them."""
        if memory is None:
            return tokens
        memory = memory.to(tokens.dtype)
        return torch.cat([memory[:, : self.read], tokens, memory[:, : self.write]], dim=1)

    def mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The segment's attention mask with the memory positions, which every sample attends."""
        ones = attention_mask.new_ones(attention_mask.shape[0], max(self.read, self.write))
        return torch.cat([ones[:, : self.read], attention_mask, ones[:, : self.write]], dim=1)

    def token_outputs(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, self.read : hidden.shape[1] - self.write]

    def written(self, hidden: torch.Tensor) -> torch.Tensor:
        # a copy, not a view: a view would keep the segment's whole hidden state alive in the chain
        return hidden[:, hidden.shape[1] - self.write :].clone()


def segment_bounds(length: int, segment_size: int, alignment: str = "left") -> list[tuple[int, int]]:
    """``(start, end)`` of each segment of a sequence of ``length`` tokens.

    ``left`` fills segments from the first token, so only the last may be short; ``right`` fills them from
    the last token, so only the first may be short.
    """
    if length <= 0:
        raise ValueError("the input is empty: pass at least one token.")
    if alignment == "left":
        return [(start, min(start + segment_size, length)) for start in range(0, length, segment_size)]
    bounds = [(max(end - segment_size, 0), end) for end in range(length, 0, -segment_size)]
    return bounds[::-1]


def packing_order(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Per row, the order that puts its real tokens first (in their own order) and its padding after them, so
    that left-aligned segments start at each sample's first real token, as they do for the sample alone: left
    padding would otherwise move every segment border. None when no row has padding before a real token."""
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return torch.argsort(attention_mask.eq(0).to(torch.int8), dim=1, stable=True)


def unpacked(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``values`` ``(batch, length, ...)`` of a batch taken in ``order`` (``packing_order``), put back where
    each position came from."""
    index = order.argsort(dim=1).view(*order.shape, *(1,) * (values.dim() - 2))
    return values.gather(1, index.expand_as(values))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions restart at 0 every segment and skip padding, so a padded sample is placed exactly as the
    same sample alone."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def padding_mask(mask: torch.Tensor) -> torch.Tensor | None:
    # None lets attention take its causal fast path when nothing is padded
    return None if bool(mask.all()) else mask


def keep_if_empty(new: torch.Tensor, old: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Samples with no token in this segment keep their previous value."""
    has_tokens = token_mask.any(dim=1)
    if bool(has_tokens.all()):
        return new
    shape = (-1,) + (1,) * (new.dim() - 1)
    return torch.where(has_tokens.view(shape), new, old.to(new.dtype))


def check_inputs(
    input_ids,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    per_token_labels: bool = True,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Checks a ``(batch, length)`` batch (with ``vocab_size``: its ids, and per-token labels, in the vocabulary);
    returns its attention mask (all ones when none is given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}: add a batch dimension.")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least one token.")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids have dtype {input_ids.dtype}, but token ids are integers: pass input_ids.long().")
    if vocab_size is not None:
        _check_ids("input_ids", input_ids, vocab_size)
        if labels is not None and per_token_labels:
            _check_ids("labels", labels[labels != IGNORE_INDEX], vocab_size)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}: give one mask value per token."
        )
    else:
        other = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:5].tolist()
        if other:
            raise ValueError(
                f"attention_mask holds values other than 0 and 1 ({', '.join(map(str, other))}): "
                "pass 1 for tokens and 0 for padding."
            )
    empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} have no tokens (their attention_mask is all zero): drop them.")
    expected = input_ids.shape if per_token_labels else input_ids.shape[:1]
    if labels is not None and labels.shape != expected:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but must have {tuple(expected)} "
            f"({'one per token' if per_token_labels else 'one class per sample'})."
        )
    return attention_mask


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    # the embedding's own error ("index out of range in self") names neither the ids nor the vocabulary
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        outside = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(
            f"{name} hold ids from {int(outside.min())} to {int(outside.max())}, outside the vocabulary of "
            f"{vocab_size} tokens (ids 0 to {vocab_size - 1}): tokenize with the backbone's own tokenizer."
        )
