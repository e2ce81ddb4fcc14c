"""Cutting long samples into fixed-size segments for a recurrent memory model.

A batch of B samples becomes ``[B, num_segments, segment_size]`` int64 tensors: ``input_ids``, ``labels``
(-100 except on answer tokens, unshifted) and ``attention_mask`` (1 on real tokens). Samples shorter than
the longest one are padded on the right; a model that walks over ``input_ids[:, s]`` gets one
``[B, segment_size]`` batch per segment (see :func:`iter_segments`).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .tasks import IGNORE_INDEX, TaskSample


def collate_segments(samples: Sequence[TaskSample], segment_size: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Context + answer of each sample, cut into segments of ``segment_size`` and stacked."""
    if segment_size <= 0:
        raise ValueError(f"segment_size must be positive, got {segment_size}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    lengths = [len(s.tokens) + len(s.answer) for s in samples]
    num_segments = -(-max(lengths) // segment_size)
    width = num_segments * segment_size
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(samples), width), dtype=np.int64)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        n_context = len(sample.tokens)
        input_ids[row, :n_context] = sample.tokens
        input_ids[row, n_context:length] = sample.answer
        labels[row, n_context:length] = sample.answer
        attention_mask[row, :length] = 1
    shape = (len(samples), num_segments, segment_size)
    return {name: torch.from_numpy(array).view(shape) for name, array in
            (("input_ids", input_ids), ("labels", labels), ("attention_mask", attention_mask))}


def iter_segments(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The ``[B, segment_size]`` views of one collated batch, segment by segment."""
    for s in range(batch["input_ids"].shape[1]):
        yield {name: tensor[:, s] for name, tensor in batch.items()}


class SegmentBatches:
    """Groups a sample stream into batches of ``batch_size`` and collates them into segments.

    The last incomplete batch is dropped so that every rank does the same number of steps.
    """

    def __init__(self, samples: Iterable[TaskSample], batch_size: int, segment_size: int, pad_id: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.samples, self.batch_size, self.segment_size, self.pad_id = samples, batch_size, segment_size, pad_id

    def __len__(self) -> int:
        return len(self.samples) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        group = []
        for sample in self.samples:
            group.append(sample)
            if len(group) == self.batch_size:
                yield collate_segments(group, self.segment_size, self.pad_id)
                group = []
