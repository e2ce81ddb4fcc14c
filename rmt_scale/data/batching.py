"""Samples to model batches: the one collate behind training, evaluation, the benchmark and the docs.

A batch is ``input_ids``, ``labels`` and ``attention_mask``, int64 ``(batch, length)``: each sample's context
then its answer, padded on the right. Labels are ``IGNORE_INDEX`` except on the answer tokens and are not
shifted: like Hugging Face causal LMs, the model predicts token t+1 from position t. The model cuts a batch
into segments itself, so a sample of ``k * segment_size`` tokens is exactly ``k`` segments.

Encoders classify, as in the 1M-token RMT paper: with :class:`AnswerClasses`, ``input_ids`` hold the context
alone (the answer is not appended, so the last segment is short by the answer's length) and ``labels`` are
the answers' class ids, ``(batch,)``.

Language modelling (:func:`collate_lm`): every token is a label, or only those of each sample's last segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..model.segments import IGNORE_INDEX
from .babi import LOCATIONS
from .tasks import TaskSample
from .tokenizer import TextTokenizer


class AnswerClasses:
    """The classes of an encoder: class ``i`` is ``LOCATIONS[i]``, as every task's answer is a bAbI location.
    A sample's class is found from its answer's token ids under the run's tokenizer, so shard samples, which
    carry ids, map the same way as generated ones."""

    def __init__(self, tokenizer: TextTokenizer):
        self.names = LOCATIONS
        self._by_ids = {tuple(ids.tolist()): index for index, ids in enumerate(tokenizer.encode_batch(LOCATIONS))}

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, answer: np.ndarray) -> int:
        ids = tuple(np.asarray(answer).tolist())
        if ids not in self._by_ids:
            raise ValueError(
                f"answer ids {list(ids)} are none of the encoder's classes ({', '.join(self.names)}, "
                "each under this tokenizer): encoders are trained on tasks answered by a location."
            )
        return self._by_ids[ids]


def whole_segments(samples: Sequence[TaskSample], segment_size: int) -> int:
    """How many segments of ``segment_size`` hold the longest sample (0 for no samples)."""
    return -(-max((len(s.tokens) + len(s.answer) for s in samples), default=0) // segment_size)


def collate(
    samples: Sequence[TaskSample], pad_id: int, length: int | None = None, classes: AnswerClasses | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` (the answer only) and ``attention_mask``, ``(batch, length)``;
    ``length`` defaults to the longest sample's. With ``classes``: the context only, and class labels."""
    with_answer = classes is None  # a decoder reads the answer too, to be trained or scored on it
    lengths = [len(s.tokens) + (len(s.answer) if with_answer else 0) for s in samples]
    length = length or max(lengths)
    input_ids = np.full((len(samples), length), pad_id, dtype=np.int64)
    labels = np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(samples), length), dtype=np.int64)
    for row, (sample, end) in enumerate(zip(samples, lengths)):
        context = len(sample.tokens)
        input_ids[row, :context] = sample.tokens
        if with_answer:
            input_ids[row, context:end] = labels[row, context:end] = sample.answer
        mask[row, :end] = 1
    if not with_answer:
        labels = np.array([classes(sample.answer) for sample in samples], dtype=np.int64)
    return _as_batch(input_ids, labels, mask)


def collate_lm(
    samples: Sequence[TaskSample], pad_id: int, length: int | None = None, last_segment: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded lm samples whose labels are their tokens (next-token loss on every token), or with
    ``last_segment`` (the segment size) only the tokens of each sample's own last segment, as the RMT papers
    score a long document; ``length`` defaults to the longest sample's."""
    lengths = [len(s.tokens) for s in samples]
    length = length or max(lengths)
    input_ids = np.full((len(samples), length), pad_id, dtype=np.int64)
    labels = np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(samples), length), dtype=np.int64)
    for row, (sample, end) in enumerate(zip(samples, lengths)):
        input_ids[row, :end] = sample.tokens
        first_label = 0 if last_segment is None else (end - 1) // last_segment * last_segment
        labels[row, first_label:end] = sample.tokens[first_label:]
        mask[row, :end] = 1
    return _as_batch(input_ids, labels, mask)


def _as_batch(input_ids: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
    }
