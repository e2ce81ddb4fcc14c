"""Training and evaluation batches.

Generated tasks: step ``t`` uses global samples ``position .. position + global_batch - 1`` (``position``
advances by the global batch each step); rank ``r`` takes, for micro-batch ``m``, the slice starting at
``(m * world_size + r) * micro_batch``. So 2 ranks x batch b see exactly the samples of 1 rank x batch 2b,
and the data position is one integer saved in every checkpoint.

Shards: each rank streams its own share (``ShardStream``); a batch is padded on the right to the longest
sample on any rank, so every rank runs the same number of segments.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..data import ShardStream, TaskGenerator, build_lm_example
from ..data.tasks import IGNORE_INDEX, TaskSample

EVAL_SEED_OFFSET = 1_000_003  # evaluation samples come from another seed than any training sample


def collate(samples: list[TaskSample], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` (the answer only) and ``attention_mask``, ``(batch, length)``."""
    examples = [build_lm_example(s) for s in samples]
    length = length or max(len(ids) for ids, _ in examples)
    input_ids = np.full((len(samples), length), pad_id, dtype=np.int64)
    labels = np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(samples), length), dtype=np.int64)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)], labels[row, : len(ids)], mask[row, : len(ids)] = ids, lab, 1
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


class TrainBatches:
    """Yields each step's micro-batches for this rank; ``state_dict`` is the data position."""

    def __init__(self, generator: TaskGenerator | None, shards: ShardStream | None, *, micro_batch: int,
                 grad_accum: int, rank: int, world_size: int, segment_size: int, pad_id: int):
        self.generator, self.shards = generator, shards
        self.micro_batch, self.grad_accum, self.rank, self.world_size = micro_batch, grad_accum, rank, world_size
        self.segment_size, self.pad_id = segment_size, pad_id
        self.position = 0  # global sample index of the next step's first sample (generated tasks)
        self._shard_iter = None
        self._shard_position = None  # the stream position right after the last sample taken

    def step(self, num_segments: int) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro-batches of one step; with generated tasks every sample has exactly
        ``num_segments`` segments."""
        if self.shards is not None:
            return [self._shard_batch() for _ in range(self.grad_accum)]
        batches = []
        for micro in range(self.grad_accum):
            first = self.position + (micro * self.world_size + self.rank) * self.micro_batch
            samples = [self.generator.sample(i, num_segments * self.segment_size)
                       for i in range(first, first + self.micro_batch)]
            batches.append(collate(samples, self.pad_id))
        self.position += self.micro_batch * self.grad_accum * self.world_size
        return batches

    def _shard_batch(self) -> dict[str, torch.Tensor]:
        samples = []
        while len(samples) < self.micro_batch:
            if self._shard_iter is None:
                self._shard_iter = iter(self.shards)
            sample = next(self._shard_iter, None)
            if sample is None:  # end of epoch: the stream moved to the next one
                self._shard_iter = None
                continue
            samples.append(sample)
            self._shard_position = ShardStream.state_after(sample)
        longest = max(len(s.tokens) + len(s.answer) for s in samples)
        # every rank must run the same number of segments: pad to the longest sample of any rank
        segments = torch.tensor(-(-longest // self.segment_size))
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(segments, op=dist.ReduceOp.MAX)
        return collate(samples, self.pad_id, int(segments) * self.segment_size)

    def state_dict(self) -> dict:
        state = {"position": self.position}
        if self.shards is not None:
            # the stream's own position lags while its generator is suspended; the last sample's is exact
            state["shards"] = {**self.shards.state_dict(), **(self._shard_position or {})}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        if self.shards is not None:
            self.shards.load_state_dict(state["shards"])
            self._shard_iter, self._shard_position = None, None


def eval_samples(generator: TaskGenerator, num_segments: int, segment_size: int, count: int, rank: int,
                 world_size: int) -> list[TaskSample]:
    """This rank's share of the fixed evaluation set at one length (the same set at every evaluation)."""
    if count % world_size:
        count += world_size - count % world_size  # equal shares, so ranks run the same number of forwards
    per_rank = count // world_size
    first = rank * per_rank
    return [generator.sample(i, num_segments * segment_size) for i in range(first, first + per_rank)]
