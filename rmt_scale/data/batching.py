"""Samples to model batches: the one collate behind training, evaluation, the benchmark and the docs.

A batch is ``input_ids``, ``labels`` and ``attention_mask``, int64 ``(batch, length)``: each sample's context
then its answer, padded on the right. Labels are ``IGNORE_INDEX`` except on the answer tokens and are not
shifted: like Hugging Face causal LMs, the model predicts token t+1 from position t. The model cuts a batch
into segments itself, so a sample of ``k * segment_size`` tokens is exactly ``k`` segments.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..model.segments import IGNORE_INDEX
from .tasks import TaskSample


def whole_segments(samples: Sequence[TaskSample], segment_size: int) -> int:
    """How many segments of ``segment_size`` hold the longest sample (0 for no samples)."""
    return -(-max((len(s.tokens) + len(s.answer) for s in samples), default=0) // segment_size)


def collate(samples: Sequence[TaskSample], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` (the answer only) and ``attention_mask``, ``(batch, length)``;
    ``length`` defaults to the longest sample's."""
    lengths = [len(s.tokens) + len(s.answer) for s in samples]
    length = length or max(lengths)
    input_ids = np.full((len(samples), length), pad_id, dtype=np.int64)
    labels = np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(samples), length), dtype=np.int64)
    for row, (sample, end) in enumerate(zip(samples, lengths)):
        context = len(sample.tokens)
        input_ids[row, :context] = sample.tokens
        input_ids[row, context:end] = labels[row, context:end] = sample.answer
        mask[row, :end] = 1
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}
