"""Training and evaluation batches.

Generated tasks: step ``t`` uses global samples ``position .. position + global_batch - 1`` (``position``
advances by the global batch each step); rank ``r`` takes, for micro-batch ``m``, the slice starting at
``(m * world_size + r) * micro_batch``. So 2 ranks x batch b see exactly the samples of 1 rank x batch 2b,
and the data position is one integer saved in every checkpoint. With ``micro_batch_tokens`` the micro-batch
shrinks with the step's length (``micro_batch_at``), and the position advances by the step's own global batch.

Shards: each rank streams its own share (``ShardStream``); a batch is padded on the right to the longest
sample on any rank, so every rank runs the same number of segments. Corrupt samples (unreadable, or token
ids outside the vocabulary) stop the run, or with ``max_corrupt`` the first ``max_corrupt`` of them over all
ranks are skipped. A step's batches are all read before its forward, so a data error leaves the model as
the last step left it.

Language modelling (``lm_loss``): shard samples are documents, each cut to the step's segment count, so the
curriculum works as for the generated tasks; labels are every token, or only the last segment's (``collate_lm``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..data import (
    AnswerClasses,
    CorruptShardError,
    ShardStream,
    TaskGenerator,
    collate,
    collate_lm,
    lm_prefix,
    whole_segments,
)
from .distributed import all_gather_objects

EVAL_SEED_OFFSET = 1_000_003  # evaluation samples come from another seed than any training sample


def micro_batch_at(micro_batch: int, micro_batch_tokens: int, sample_tokens: int) -> int:
    """Samples in a micro-batch of ``sample_tokens``-token samples: ``micro_batch``, or fewer (at least 1) where
    they would hold more than ``micro_batch_tokens`` tokens (0: no cap)."""
    if not micro_batch_tokens:
        return micro_batch
    return max(1, min(micro_batch, micro_batch_tokens // max(sample_tokens, 1)))


class DataError(Exception):
    """The training data stops the run: a corrupt sample, or more than ``max_corrupt`` of them, on some rank.
    Every rank raises it at the same micro-batch, so all of them can still write a checkpoint together."""


class TrainBatches:
    """Yields each step's micro-batches for this rank; ``state_dict`` is the data position."""

    def __init__(
        self,
        generator: TaskGenerator | None,
        shards: ShardStream | None,
        *,
        micro_batch: int,
        grad_accum: int,
        micro_batch_tokens: int = 0,
        rank: int,
        world_size: int,
        segment_size: int,
        pad_id: int,
        max_corrupt: int = 0,
        classes: AnswerClasses | None = None,
        lm_loss: str | None = None,
    ):
        self.generator, self.shards = generator, shards
        self.micro_batch, self.grad_accum, self.rank, self.world_size = micro_batch, grad_accum, rank, world_size
        self.segment_size, self.pad_id, self.max_corrupt = segment_size, pad_id, max_corrupt
        self.micro_batch_tokens = micro_batch_tokens
        self.classes = classes  # an encoder's: batches carry class labels
        self.lm_loss = lm_loss  # "all" or "last" for lm samples, None for task samples
        self.position = 0  # global sample index of the next step's first sample (generated tasks)
        self._shard_iter = None
        self._shard_position = None  # the stream position right after the last sample taken
        self.corrupt_samples = 0  # skipped so far, all ranks, since the start of the run
        self._corrupt_before_resume = 0

    def step(self, num_segments: int) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro-batches of one step; with generated tasks every sample has exactly
        ``num_segments`` segments, lm samples at most."""
        batch = micro_batch_at(self.micro_batch, self.micro_batch_tokens, num_segments * self.segment_size)
        if self.shards is not None:
            before = self.state_dict()
            try:
                return [self._shard_batch(num_segments, batch) for _ in range(self.grad_accum)]
            except DataError:  # a checkpoint written now must start this step again
                self._shard_position = {name: before["shards"][name] for name in ("epoch", "position")}
                self.corrupt_samples = before["corrupt_samples"]
                raise
        batches = []
        for micro in range(self.grad_accum):
            first = self.position + (micro * self.world_size + self.rank) * batch
            samples = [self.generator.sample(i, num_segments * self.segment_size) for i in range(first, first + batch)]
            batches.append(collate(samples, self.pad_id, classes=self.classes))
        self.position += batch * self.grad_accum * self.world_size
        return batches

    def _shard_batch(self, num_segments: int, batch: int) -> dict[str, torch.Tensor]:
        samples, error = [], None
        try:
            while len(samples) < batch:
                if self._shard_iter is None:
                    self._shard_iter = iter(self.shards)
                sample = next(self._shard_iter, None)
                if sample is None:  # end of epoch: the stream moved to the next one
                    self._shard_iter = None
                    continue
                self._shard_position = ShardStream.state_after(sample)
                if self.lm_loss is not None:
                    sample = lm_prefix(sample, num_segments * self.segment_size)
                samples.append(sample)
        except CorruptShardError as corrupt:
            error = f"rank {self.rank}: {corrupt}"
        # One exchange per micro-batch. Every rank must run the same number of segments (pad to the longest
        # sample of any rank), and all must stop together on a data error, so that they can checkpoint.
        mine = torch.tensor([whole_segments(samples, self.segment_size), self.shards.corrupt_count, error is not None])
        ranks = [mine]
        if dist.is_initialized() and self.world_size > 1:
            ranks = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(ranks, mine)
        segments, corrupt, failed = torch.stack(ranks).T
        self.corrupt_samples = self._corrupt_before_resume + int(corrupt.sum())
        if failed.any():
            raise DataError(next(e for e in all_gather_objects(error) if e))
        if self.corrupt_samples > self.max_corrupt:
            raise DataError(
                f"{self.corrupt_samples} corrupt samples, more than --skip_corrupt_samples "
                f"{self.max_corrupt} (each was logged with its shard and member): re-create those "
                "shards, or allow more with --skip_corrupt_samples"
            )
        length = int(segments.max()) * self.segment_size
        if self.lm_loss is not None:
            return collate_lm(samples, self.pad_id, length, self.segment_size if self.lm_loss == "last" else None)
        return collate(samples, self.pad_id, length, self.classes)

    def state_dict(self) -> dict:
        state = {"position": self.position}
        if self.shards is not None:
            # the stream's own position lags while its generator is suspended; the last sample's is exact
            state["shards"] = {**self.shards.state_dict(), **(self._shard_position or {})}
            state["corrupt_samples"] = self.corrupt_samples
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        if self.shards is not None:
            self.shards.load_state_dict(state["shards"])
            self._shard_iter, self._shard_position = None, None
            self.corrupt_samples = self._corrupt_before_resume = state.get("corrupt_samples", 0)


def eval_indices(count: int, rank: int, world_size: int) -> range:
    """The sample indices of this rank's share of the fixed evaluation set of ``count`` samples at one length."""
    if count % world_size:
        count += world_size - count % world_size  # equal shares, so ranks run the same number of forwards
    per_rank = count // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)
