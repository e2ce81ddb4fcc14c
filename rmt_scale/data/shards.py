"""Webdataset tar shards of task samples: a writer, and a streaming reader over any fsspec URL.

Shard format (standard webdataset; sample keys have no dots):
    <key>.tokens.npy   int32 context (background + facts + question)
    <key>.answer.npy   int32 answer ids
    <key>.meta.json    task, question, answer_text, facts, fact_positions, fact_lengths, num_tokens, meta
Language-modelling samples (task ``lm``, :mod:`.text`) have the same members: documents as tokens, an empty
answer, no question or facts.
plus ``index.json`` next to the shards (see :mod:`.tars`, which reads both).

Reading is a chain of webdataset's stages and small ones of ours. Per shard, :func:`.tars.iter_tar_samples`
opens it with fsspec and runs webdataset's ``tar_file_expander`` and ``group_by_keys``; webdataset's
``Decoder`` then decodes each record with our two handlers only. Ours: which shards and samples each rank
and worker reads (below), the token id check, and filling the slots of corrupt samples. webdataset's
``split_by_node``/``split_by_worker`` split whole shards and its shuffle is a sample buffer, so neither gives
equal steps per rank or an exact resume.

Reading never unpickles: ``.npy`` goes through ``np.load(allow_pickle=False)``, metadata is JSON, and every
other member stays bytes. Given the vocabulary size, the reader also checks every token id, so a damaged
payload (which leaves the tar valid) is named here rather than failing as an index error inside the embedding.

Splitting: each epoch, all ranks shuffle the shard order with the same seed, lay the samples out in that
order and cut them into ``world_size`` equal contiguous ranges (the last ``total % world_size`` samples
of the epoch are dropped; they differ every epoch because the shard order does). So a rank opens only
the shards its range touches. Inside a rank, DataLoader worker ``w`` of ``W`` takes positions
``w, w+W, w+2W, ...``; the DataLoader's round-robin then yields the rank's samples in exactly the same
order for any number of workers, which makes resuming exact. The price: every worker streams through
all of its rank's shards (passing over the others' samples without decoding them).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import fsspec
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import TarWriter
from webdataset.autodecode import Decoder, DecodingError, handle_extension

from .tars import INDEX_NAME, CorruptShardError, iter_tar_samples, resolve_shards, shard_index
from .tasks import TaskSample
from .text import LM_TASK
from .tokenizer import TextTokenizer, has_tokenizer, load_tokenizer

log = logging.getLogger(__name__)
SHARD_PATTERN = "shard-{:06d}.tar"


# ----------------------------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: TaskSample, key: str) -> dict:
    """The webdataset record (``__key__`` plus field -> bytes) of one sample."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; webdataset splits fields at dots")
    meta = dict(
        task=sample.task,
        question=sample.question,
        answer_text=sample.answer_text,
        facts=sample.facts,
        fact_positions=np.asarray(sample.fact_positions).tolist(),
        fact_lengths=np.asarray(sample.fact_lengths).tolist(),
        num_tokens=sample.num_tokens,
        meta=sample.meta,
    )
    return {
        "__key__": key,
        "tokens.npy": _npy_bytes(sample.tokens.astype(np.int32, copy=False)),
        "answer.npy": _npy_bytes(sample.answer.astype(np.int32, copy=False)),
        "meta.json": json.dumps(meta).encode(),
    }


def write_shards(
    samples: Iterable[TaskSample],
    out: str,
    *,
    max_samples: int = 64,
    max_bytes: int = 1 << 30,
    extra_index: dict | Callable[[], dict] | None = None,
) -> dict:
    """Writes samples into ``out/shard-NNNNNN.tar`` (any fsspec URL) and ``out/index.json``; returns the index.

    A new shard starts after ``max_samples`` samples or once a shard holds ``max_bytes``. The index records the
    longest sample's ``num_tokens``, which a training run sizes its memory by before it reads a sample.
    ``extra_index`` adds fields to the index; a callable is called once every sample is written (for counts the
    samples' source keeps).
    """
    out = out.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    shards: list[dict] = []
    writer = stream = None
    size = longest = 0
    try:
        for i, sample in enumerate(samples):
            if writer is None or shards[-1]["samples"] >= max_samples or size >= max_bytes:
                if writer is not None:
                    writer.close()
                    stream.close()
                name = SHARD_PATTERN.format(len(shards))
                stream = fsspec.open(f"{out}/{name}", "wb").open()
                writer = TarWriter(stream, encoder=False, mtime=0)  # fixed mtime: same bytes every run
                shards.append({"name": name, "samples": 0})
                size = 0
            size += writer.write(encode_sample(sample, f"{i:09d}"))
            shards[-1]["samples"] += 1
            longest = max(longest, sample.num_tokens)
    finally:
        if writer is not None:
            writer.close()
            stream.close()
    if callable(extra_index):
        extra_index = extra_index()
    total = sum(s["samples"] for s in shards)
    index = {"shards": shards, "total_samples": total, "max_sample_tokens": longest, **(extra_index or {})}
    with fsspec.open(f"{out}/{INDEX_NAME}", "w") as f:
        json.dump(index, f, indent=1)
    return index


def tokenizer_index_fields(tokenizer: TextTokenizer, name: str) -> dict:
    """What ``index.json`` records of the tokenizer the shards were made with (saved in ``tokenizer/`` too)."""
    return {"tokenizer": "tokenizer", "tokenizer_name": name, "tokenizer_fingerprint": tokenizer.fingerprint}


def check_shard_tokenizer(source: str | Sequence[str], tokenizer: TextTokenizer, name: str) -> None:
    """Raises ValueError when shards were made with another tokenizer than ``tokenizer`` (called ``name``): their
    ids would mean other words, or fall outside the vocabulary and read as corrupt samples. Compared with what
    their index records, or for shards written before it recorded that, with the tokenizer saved next to them
    (when it is a local directory); shards named without an index are not checked."""
    found = shard_index(source)
    if found is None:
        return
    index_url, index = found
    saved = f"{index_url.rpartition('/')[0]}/{index.get('tokenizer', 'tokenizer')}"
    made_with = index.get("tokenizer_fingerprint")
    if made_with is None and os.path.isdir(saved) and has_tokenizer(saved):
        made_with = load_tokenizer(saved).fingerprint
    if made_with is not None and made_with != tokenizer.fingerprint:
        raise ValueError(
            f"--shards {source} were made with tokenizer {index.get('tokenizer_name', saved)}, this run uses "
            f"{name}: pass --tokenizer {saved} (their tokenizer, saved with them) or re-create the shards "
            f"with --tokenizer {name}."
        )


def check_shard_task(source: str | Sequence[str], task: str) -> None:
    """Raises ValueError when ``task`` is ``lm`` and the shards hold task samples, or the other way round (what
    their index records; shards named without an index are not checked). Among the generated tasks any shards
    go: a run evaluates on its own ``--task``."""
    found = shard_index(source)
    made_for = None if found is None else found[1].get("task")
    if made_for is None or (made_for == LM_TASK) == (task == LM_TASK):
        return
    if task == LM_TASK:
        raise ValueError(
            f"--shards {source} hold {made_for} samples, not documents: write lm shards with "
            f"tools/make_shards.py --task lm --inputs FILES --out DIR, or train with --task {made_for}."
        )
    raise ValueError(f"--shards {source} hold documents (task lm): train them with --task lm.")


# ----------------------------------------------------------------------------------------------- reading


def _token_ids(data: bytes, vocab_size: int | None) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for bad headers and object arrays
        # numpy's own message for pickled data advises loading it unsafely; it is never loaded here
        reason = "it holds pickled (object) data, which is never loaded" if "pickle" in str(e) else str(e)
        raise ValueError(f"not a plain .npy integer array ({reason})") from e
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-d integer array, got {array.dtype} {array.shape}")
    if vocab_size is not None:
        bad = np.flatnonzero((array < 0) | (array >= vocab_size))
        if bad.size:
            raise ValueError(
                f"token id {array[bad[0]]} at position {bad[0]} is outside the vocabulary of "
                f"{vocab_size} ids (0..{vocab_size - 1})"
            )
    return array.astype(np.int32, copy=False)


def _meta(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError as e:
        raise ValueError(f"invalid JSON ({e})") from e


def _decoder(vocab_size: int | None) -> Decoder:
    """webdataset's Decoder with only our two handlers. Its defaults (``pre``/``post``) would unpickle
    ``.pyd``/``.pickle`` members and ``torch.load`` ``.pth``; here every other member stays bytes."""
    return Decoder(
        [
            handle_extension("tokens.npy answer.npy", partial(_token_ids, vocab_size=vocab_size)),
            handle_extension("meta.json", _meta),
        ],
        pre=[],
        post=[],
    )


def decode_sample(record: dict, url: str, vocab_size: int | None = None) -> TaskSample:
    """A :class:`TaskSample` from a raw record; only ``.npy`` arrays and JSON are decoded. With
    ``vocab_size``, token ids outside ``0..vocab_size-1`` raise :class:`CorruptShardError`."""
    key = record["__key__"]
    for field in ("tokens.npy", "answer.npy", "meta.json"):
        if field not in record:
            raise CorruptShardError(url, f"{key}.{field}", "member missing")
    try:
        fields = _decoder(vocab_size)(record)
    except DecodingError as e:  # names the field; the handler's error holds the reason
        raise CorruptShardError(url, f"{key}.{e.k}", str(e.__cause__)) from e.__cause__
    meta = fields["meta.json"]
    return TaskSample(
        task=meta["task"],
        tokens=fields["tokens.npy"],
        answer=fields["answer.npy"],
        question=meta["question"],
        answer_text=meta["answer_text"],
        facts=meta["facts"],
        fact_positions=np.asarray(meta["fact_positions"], dtype=np.int64),
        fact_lengths=np.asarray(meta["fact_lengths"], dtype=np.int64),
        num_tokens=meta["num_tokens"],
        meta={**meta["meta"], "shard": url, "key": key},
    )


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """Streams :class:`TaskSample` from shards; one ``iter()`` is one epoch of ``len(self)`` samples.

    Every rank gets exactly ``total_samples // world_size`` samples per epoch. Each yielded sample's
    ``meta`` holds ``epoch`` and ``position`` (its place in this rank's epoch), so a training loop can
    checkpoint with :meth:`state_after` even when DataLoader workers did the reading.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        *,
        counts: Sequence[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        skip_corrupt: bool = False,
        vocab_size: int | None = None,
    ):
        self.urls, self.counts = resolve_shards(source, counts)
        default_rank, default_world = _dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.total_samples = sum(self.counts)
        if self.total_samples < self.world_size:
            raise ValueError(
                f"{self.total_samples} samples cannot give each of {self.world_size} ranks one "
                "sample per epoch; write more samples"
            )
        self.shuffle, self.seed, self.skip_corrupt, self.vocab_size = shuffle, seed, skip_corrupt, vocab_size
        self.epoch, self.position, self.corrupt_count = 0, 0, 0

    def __len__(self) -> int:
        return self.total_samples // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "total_samples": self.total_samples,
        }

    @staticmethod
    def state_after(sample: TaskSample) -> dict:
        """The position right after ``sample`` (to pass to :meth:`load_state_dict` on resume)."""
        return {"epoch": sample.meta["epoch"], "position": sample.meta["position"] + 1}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "world_size", "total_samples"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume: checkpoint has {name}={state[name]}, this stream has "
                    f"{getattr(self, name)}; resume with the same shards, seed and world size"
                )
        self.epoch, self.position = state["epoch"], state["position"]

    def _shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.urls))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))

    def __iter__(self) -> Iterator[TaskSample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = self.epoch, self.position
        per_rank = len(self)
        mine = range(start + worker, per_rank, num_workers)  # rank-local positions this worker yields
        yield from self._fill_gaps(self._read_positions(epoch, mine), mine, epoch)
        if self.corrupt_count:
            log.warning(
                "rank %d worker %d: skipped %d corrupt samples by the end of epoch %d",
                self.rank,
                worker,
                self.corrupt_count,
                epoch,
            )
        if info is None:  # in-process iteration: the next iter() is the next epoch
            self.epoch, self.position = epoch + 1, 0

    def _read_positions(self, epoch: int, positions: range) -> Iterator[TaskSample | CorruptShardError]:
        """One sample (or the error that replaced it) per position, in order."""
        if not positions:
            return
        order = self._shard_order(epoch)
        counts = np.asarray(self.counts)[order]
        shard_starts = np.concatenate([[0], np.cumsum(counts)])  # epoch-global index of each shard's first sample
        rank_start = self.rank * len(self)
        first, last = rank_start + positions[0], rank_start + positions[-1]
        for k in range(np.searchsorted(shard_starts, first, side="right") - 1, len(order)):
            lo, hi = shard_starts[k], shard_starts[k + 1]
            if lo > last:
                return
            wanted = [g - lo for g in range(max(first, lo), min(last, hi - 1) + 1) if (g - first) % positions.step == 0]
            if not wanted:
                continue
            yield from self._read_shard(self.urls[order[k]], wanted)

    def _read_shard(self, url: str, wanted: list[int]) -> Iterator[TaskSample | CorruptShardError]:
        wanted_set, final = set(wanted), wanted[-1]
        done = 0
        try:
            for record in iter_tar_samples(url, select=lambda o: None if o > final else o in wanted_set):
                try:
                    yield decode_sample(record, url, self.vocab_size)
                except CorruptShardError as e:
                    yield e
                done += 1
        except CorruptShardError as e:
            for _ in range(len(wanted) - done):  # a broken stream loses the rest of this shard
                yield e
            return
        if done < len(wanted):
            e = CorruptShardError(url, "<end of archive>", "holds fewer samples than the index's count")
            for _ in range(len(wanted) - done):
                yield e

    def _fill_gaps(self, items: Iterator, positions: range, epoch: int) -> Iterator[TaskSample]:
        """Raises on corrupt samples, or (skip_corrupt) fills their slots with the nearest good sample.

        Filling instead of dropping keeps every rank at exactly ``len(self)`` samples, so ranks never wait
        on each other for a step that one of them does not have.
        """
        pending: deque[int] = deque()  # positions still owed a sample
        last_good = None
        for slot, item in zip(positions, items):
            pending.append(slot)
            if isinstance(item, CorruptShardError):
                if not self.skip_corrupt:
                    raise item
                self.corrupt_count += 1
                log.warning("skipping corrupt sample (%d so far in this worker): %s", self.corrupt_count, item)
                if last_good is None:
                    continue  # owe this slot until the first good sample arrives
                item = last_good
            last_good = item
            while pending:
                position = pending.popleft()
                yield _with_position(item, epoch, position)
                self.position = position + 1  # only meaningful when iterated in-process
        if pending:
            raise ValueError(
                f"rank {self.rank}: every sample of this worker's share is corrupt "
                f"({self.corrupt_count} skipped); there is nothing to train on"
            )


def _with_position(sample: TaskSample, epoch: int, position: int) -> TaskSample:
    return TaskSample(**{**sample.__dict__, "meta": {**sample.meta, "epoch": epoch, "position": position}})
