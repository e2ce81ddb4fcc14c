"""Documents for language modelling (read by :mod:`.documents`), tokenized and cut into samples of the ``lm`` task.

Two layouts turn documents into samples of ``num_tokens`` tokens:
    ``pack``   documents back to back, each followed by the tokenizer's EOS (or SEP), cut into samples of
               exactly ``num_tokens``; the tail shorter than one sample is dropped (and counted)
    ``whole``  each document its own sample, cut to ``num_tokens``; documents shorter than ``min_tokens`` are
               dropped (and counted)

An lm sample is a :class:`TaskSample` with task ``lm``, an empty answer and no facts: every token is a target.
Text that makes no sample raises :class:`.documents.DocumentError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .documents import Document, DocumentError
from .tasks import TaskSample
from .tokenizer import TextTokenizer

LM_TASK = "lm"
LAYOUTS = ("pack", "whole")
ENCODE_BATCH = 64  # documents tokenized per call: the fast tokenizers parallelise a batch


@dataclass
class LMCounts:
    """What went into a set of lm shards (written to their index.json)."""

    documents: int = 0  # read, dropped ones included
    documents_dropped: int = 0  # whole layout: shorter than min_tokens
    document_tokens: int = 0  # tokens of every document read (packing's separators not included)
    tokens_dropped: int = 0  # of documents dropped, of text cut off, and packing's tail
    sample_tokens: int = 0  # in the samples written

    def as_index(self) -> dict:
        return dataclasses.asdict(self)


def lm_sample(tokens: np.ndarray, source: str) -> TaskSample:
    """A sample of the ``lm`` task: every token is a target, so there is no answer."""
    return TaskSample(
        task=LM_TASK,
        tokens=np.asarray(tokens, dtype=np.int32),
        answer=np.zeros(0, dtype=np.int32),
        question="",
        answer_text="",
        facts=[],
        fact_positions=np.zeros(0, dtype=np.int64),
        fact_lengths=np.zeros(0, dtype=np.int64),
        num_tokens=len(tokens),
        meta={"source": source},
    )


def lm_prefix(sample: TaskSample, num_tokens: int) -> TaskSample:
    """The first ``num_tokens`` tokens of an lm sample (all of it if shorter): a curriculum step's length."""
    if len(sample.tokens) <= num_tokens:
        return sample
    return dataclasses.replace(sample, tokens=sample.tokens[:num_tokens], num_tokens=num_tokens)


def _tokenized(documents: Iterable[Document], tokenizer: TextTokenizer) -> Iterator[tuple[Document, np.ndarray]]:
    batch: list[Document] = []
    for document in documents:
        batch.append(document)
        if len(batch) == ENCODE_BATCH:
            yield from zip(batch, tokenizer.encode_batch([d.text for d in batch]))
            batch = []
    yield from zip(batch, tokenizer.encode_batch([d.text for d in batch]))


def separator_id(tokenizer: TextTokenizer) -> int:
    """The id packing puts after each document: EOS, or SEP for a tokenizer without one."""
    for token_id in (tokenizer.eos_id, tokenizer.sep_id):
        if token_id is not None:
            return token_id
    raise DocumentError("the tokenizer has neither an EOS nor a SEP token to separate documents: use --layout whole.")


def _packed(tokenized, num_tokens: int, separator: int, counts: LMCounts) -> Iterator[TaskSample]:
    pending: list[np.ndarray] = []
    pending_tokens, source = 0, None
    for document, ids in tokenized:
        source = source or document.source  # a sample is named after the document it starts in
        pending += [ids, np.array([separator], dtype=np.int32)]
        pending_tokens += len(ids) + 1
        if pending_tokens < num_tokens:
            continue
        stream = np.concatenate(pending)
        whole = len(stream) // num_tokens * num_tokens
        for start in range(0, whole, num_tokens):
            yield lm_sample(stream[start : start + num_tokens], source)
            source = document.source
        pending, pending_tokens = [stream[whole:]], len(stream) - whole
        source = document.source if pending_tokens else None
    counts.tokens_dropped += pending_tokens


def _whole(tokenized, num_tokens: int, min_tokens: int, counts: LMCounts) -> Iterator[TaskSample]:
    for document, ids in tokenized:
        if len(ids) < min_tokens:
            counts.documents_dropped += 1
            counts.tokens_dropped += len(ids)
            continue
        counts.tokens_dropped += max(0, len(ids) - num_tokens)
        yield lm_sample(ids[:num_tokens], document.source)


def lm_samples(
    documents: Iterable[Document],
    tokenizer: TextTokenizer,
    num_tokens: int,
    *,
    layout: str = "pack",
    min_tokens: int = 1,
    counts: LMCounts | None = None,
) -> Iterator[TaskSample]:
    """Samples of ``num_tokens`` tokens (whole layout: at most) from ``documents``; ``counts`` is updated as they
    are read. Raises DocumentError at the end when not one sample came out."""
    counts = LMCounts() if counts is None else counts
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown: choose one of {', '.join(LAYOUTS)}.")

    def counted(pairs):
        for document, ids in pairs:
            counts.documents += 1
            counts.document_tokens += len(ids)
            yield document, ids

    tokenized = counted(_tokenized(documents, tokenizer))
    if layout == "pack":
        samples = _packed(tokenized, num_tokens, separator_id(tokenizer), counts)
    else:
        samples = _whole(tokenized, num_tokens, min_tokens, counts)
    written = 0
    for sample in samples:
        written += 1
        counts.sample_tokens += len(sample.tokens)
        yield sample
    if written:
        return
    if layout == "whole" and counts.documents:
        raise DocumentError(
            f"all {counts.documents} documents are shorter than --min-tokens {min_tokens}, so all were dropped: "
            "lower --min-tokens or give longer documents."
        )
    raise DocumentError(
        f"the documents hold {counts.document_tokens} tokens, fewer than one sample of --tokens {num_tokens}: "
        "lower --tokens or give more text."
    )
