"""Exact-answer accuracy by input length, and language-modelling loss by segment, with streaming inference.

The model reads each evaluation sample one segment per call, passing its memory on (RMT: the memory
tokens; ARMT: every layer's associative state; encoders: the memory tokens), under ``no_grad``: what is
kept is one segment's activations and the memory, whatever the length, so lengths far beyond training
cost only time. A model without memory carries nothing from one segment to the next, so only its last
segment is run. Long lengths may get fewer samples than short ones (``samples_at``). A decoder's sample
counts as correct when every answer token is the argmax prediction, an encoder's when the argmax class of
its last segment is the answer's class. Every rank evaluates its share and the counts are summed, so all
ranks see the same accuracies.

Language modelling (``--task lm``): the loss of segment k given the memory of segments 1..k-1
(:func:`loss_by_segment`), next to the backbone alone over as many preceding tokens as its positions reach
(:func:`full_attention_loss_by_segment`). A segment's targets are its own tokens after its first, predicted from
inside the segment, so that the memory model, its no-memory twin (segment k alone) and full attention predict the
same tokens and differ only in what they see before them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..data import AnswerClasses, ShardStream, TaskGenerator, TaskSample, collate_lm, lm_prefix, whole_segments
from ..model.config import ConfigError
from ..model.segments import IGNORE_INDEX
from .batches import eval_indices

PROGRESS_MIN_SEGMENTS = 1024  # lengths from here on show a progress bar (rank 0): they take minutes
# Bytes a forward holds per position and hidden unit of one layer, at least: a few float32 tensors of the hidden
# width (residual, norm, attention output) and the MLP's wider one. Low on purpose: only a batch that cannot
# fit is refused.
ACTIVATION_BYTES = 32


def batch_bytes(
    batch: int, length: int, token_bytes: int, positions: int, hidden: int, layers: int = 1, logits: int = 0
) -> tuple[int, int]:
    """``(tokens, segment)``: a lower bound of the bytes a batch of ``batch`` samples of ``length`` tokens holds
    at once. Its tokens at ``token_bytes`` each (plus two samples' worth, the one being drawn and its pieces),
    and one segment of ``positions`` through ``layers`` layers (1 without grad, where a layer's activations go
    once the next has run) plus ``logits`` float32 values per sample (the vocabulary times the segment where a
    segment's logits are kept)."""
    tokens = (batch + 2) * length * token_bytes
    return tokens, batch * (positions * hidden * layers * ACTIVATION_BYTES + 4 * logits)


def check_memory(
    subject: str,
    needed: tuple[int, int],
    device: torch.device,
    fix: str,
    holds: str = "its tokens and one segment's activations",
    host_only: int = 0,
) -> None:
    """Raises ConfigError when ``needed`` (``batch_bytes``: the tokens, and what is on ``device``), with
    ``host_only`` bytes more in host memory, exceeds the memory available: the host's (``psutil``), and the
    GPU's free memory on CUDA, where the tokens are copied to as well. ``holds`` says what was counted."""
    import psutil

    tokens, segment = needed
    host = psutil.virtual_memory().available
    checks = [("this host", tokens + host_only + (0 if device.type == "cuda" else segment), host)]
    if device.type == "cuda":
        checks.append((str(device), tokens + segment, torch.cuda.mem_get_info(device)[0]))
    for where, wanted, available in checks:
        if wanted > available:
            raise ConfigError(
                f"{subject} needs at least {wanted / 2**30:.1f} GiB ({holds}) but {where} has "
                f"{available / 2**30:.1f} GiB available: {fix}."
            )


@torch.no_grad()
def streaming_correct(
    model, input_ids: torch.Tensor, labels: torch.Tensor, segment_size: int, progress: tqdm | None = None
) -> torch.Tensor:
    """Per-sample exact match, reading ``input_ids`` (``(batch, length)`` of any integer type, same length, no
    padding) segment by segment. ``labels``: a decoder's per-token labels for the last ``labels.shape[1]``
    tokens of the input (the whole input, or a tail that covers at least the last segment), whose answer must
    lie in the last segment (true for task samples of whole segments); or an encoder's classes, ``(batch,)``.
    ``progress`` advances by one per segment read, the last included."""
    length = input_ids.shape[1]
    last_start = (length - 1) // segment_size * segment_size
    memory = None
    # without memory the earlier segments cannot change the last one's output
    first_start = 0 if model.config.num_mem_tokens else last_start
    for start in range(first_start, last_start, segment_size):
        memory = model(input_ids[:, start : start + segment_size].long(), memory=memory).memory
        if progress is not None:
            progress.update(1)
    last = input_ids[:, last_start:].long()
    if labels.dim() == 1:  # an encoder's logits are already its last segment's classification
        correct = model(last, memory=memory).logits.argmax(dim=-1) == labels
        if progress is not None:
            progress.update(1)
        return correct
    covered = length - labels.shape[1]  # the tokens before the labels' first one
    if covered > last_start:
        raise ValueError(
            f"labels cover the last {labels.shape[1]} tokens, fewer than the last segment's "
            f"{length - last_start}: pass labels for the whole last segment or the whole input."
        )
    logits = model(last, memory=memory, return_logits=True).logits
    if progress is not None:
        progress.update(1)
    # the token at position p is predicted from position p - 1
    targets = labels[:, last_start + 1 - covered :]
    predicted = logits[:, :-1].argmax(dim=-1)
    answer = targets != IGNORE_INDEX
    if bool((labels[:, : last_start + 1 - covered] != IGNORE_INDEX).any()):
        raise ValueError("an answer starts before the last segment: evaluate with whole-segment lengths.")
    return ((predicted == targets) | ~answer).all(dim=1)


def stacked_batch(
    generator: TaskGenerator,
    indices: Sequence[int],
    num_tokens: int,
    segment_size: int,
    pad_id: int,
    classes: AnswerClasses | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation samples ``indices`` of ``num_tokens`` tokens as ``(input_ids, labels)`` for
    :func:`streaming_correct`, at 4 bytes a token: int32 tokens (a decoder's followed by the answer),
    right-padded to the longest, and only the last segment's labels (an encoder's: the answer classes). Each
    sample is copied in as it is drawn and then dropped, so a batch of million-token samples costs its tokens and
    nothing more."""
    input_ids = np.full((len(indices), num_tokens), pad_id, dtype=np.int32)
    last_start = (num_tokens - 1) // segment_size * segment_size
    labels = np.full((len(indices), num_tokens - last_start), IGNORE_INDEX, dtype=np.int64)
    answer_classes, longest = [], 0
    for row, index in enumerate(indices):
        sample = generator.sample(index, num_tokens)
        context = len(sample.tokens)
        input_ids[row, :context] = sample.tokens
        if classes is None:
            if context < last_start:
                raise ValueError(
                    f"sample {index}'s answer starts before its last segment: evaluate with whole-segment lengths."
                )
            end = context + len(sample.answer)
            input_ids[row, context:end] = labels[row, context - last_start : end - last_start] = sample.answer
        else:
            end = context
            answer_classes.append(classes(sample.answer))
        longest = max(longest, end)
    if classes is not None:
        return torch.from_numpy(input_ids[:, :longest]), torch.tensor(answer_classes, dtype=torch.long)
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def samples_at(num_tokens: int, samples: int, max_tokens: int | None) -> int:
    """Evaluation samples at a length of ``num_tokens``: ``samples``, fewer (at least 1) where they would read
    more than ``max_tokens`` tokens together (None: no limit)."""
    if max_tokens is None:
        return samples
    return max(1, min(samples, max_tokens // num_tokens))


def evaluate_by_length(
    model,
    generator: TaskGenerator,
    lengths: list[int],
    *,
    segment_size: int,
    samples: int,
    batch_size: int,
    pad_id: int,
    rank: int,
    world_size: int,
    classes: AnswerClasses | None = None,
    max_tokens: int | None = None,
    between_batches: Callable[[], None] | None = None,
) -> dict[int, float]:
    """``{num_segments: accuracy}`` over ``samples`` fixed evaluation samples per length (fewer past
    ``max_tokens``, see ``samples_at``); ``classes`` for an encoder. ``between_batches`` is called before every
    batch, on every rank as often (their shares are equal, see ``eval_indices``), so it may run a collective; it
    may raise to stop the evaluation (the trainer's stop signal), which leaves the model in eval mode."""
    was_training = model.training
    model.eval()
    results = {}
    device = next(model.parameters()).device
    for num_segments in lengths:
        count = samples_at(num_segments * segment_size, samples, max_tokens)
        mine = eval_indices(count, rank, world_size)
        counts = torch.zeros(2, dtype=torch.float64)
        batches = range(0, len(mine), batch_size)
        with_memory = bool(model.config.num_mem_tokens)  # without memory only the last segment is read
        progress = tqdm(
            total=num_segments * len(batches),
            desc=f"evaluating {num_segments} segments",
            unit="seg",
            leave=False,
            disable=rank != 0 or num_segments < PROGRESS_MIN_SEGMENTS or not with_memory,
        )
        for start in batches:
            if between_batches is not None:
                between_batches()
            # a batch's samples are drawn when it starts, so only one batch of them is held at a time
            input_ids, labels = stacked_batch(
                generator, mine[start : start + batch_size], num_segments * segment_size, segment_size, pad_id, classes
            )
            correct = streaming_correct(model, input_ids.to(device), labels.to(device), segment_size, progress)
            counts += torch.tensor([correct.sum().item(), correct.numel()], dtype=torch.float64)
        progress.close()
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(counts)
        results[num_segments] = (counts[0] / counts[1]).item()
    model.train(was_training)
    return results


# ----------------------------------------------------------------------------------------------- by segment


def lm_eval_samples(source: str, count: int, vocab_size: int) -> list[TaskSample]:
    """The first ``count`` samples of lm shards, in order (fewer if they hold fewer): the same on every rank."""
    stream = ShardStream(source, rank=0, world_size=1, shuffle=False, vocab_size=vocab_size)
    return list(itertools.islice(stream, count))


def _next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(loss sum, targets)`` of predicting each token from the one before it, inside one segment."""
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return torch.stack([losses[valid].sum().double(), valid.sum().double()])


@torch.no_grad()
def loss_by_segment(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, segment_size: int) -> torch.Tensor:
    """``(segments, 2)``: each segment's loss sum and number of targets, read segment by segment with the memory
    passed on (a model without memory reads each segment alone). Padding goes on the right, and every sample needs
    a token in the last segment (the model refuses a sample without tokens)."""
    memory, totals = None, []
    for start in range(0, input_ids.shape[1], segment_size):
        ids, mask = input_ids[:, start : start + segment_size], attention_mask[:, start : start + segment_size]
        output = model(ids, attention_mask=mask, memory=memory, return_logits=True)
        memory = output.memory
        totals.append(_next_token_loss(output.logits, ids, mask))
    return torch.stack(totals)


@torch.no_grad()
def full_attention_loss_by_segment(
    backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, segment_size: int, reach: int
) -> torch.Tensor:
    """As :func:`loss_by_segment` for the backbone alone, given the last ``reach`` tokens (its positions) that
    end each segment: full attention over the whole prefix as long as it fits."""
    totals = []
    for start in range(0, input_ids.shape[1], segment_size):
        end = min(start + segment_size, input_ids.shape[1])
        first = max(0, end - reach)
        logits = backbone(input_ids=input_ids[:, first:end], attention_mask=attention_mask[:, first:end]).logits
        totals.append(
            _next_token_loss(logits[:, start - first :], input_ids[:, start:end], attention_mask[:, start:end])
        )
    return torch.stack(totals)


def evaluate_by_segment(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    samples: Sequence[TaskSample],
    max_segments: int,
    *,
    segment_size: int,
    batch_size: int,
    pad_id: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[int, float]:
    """``{k: mean next-token loss of segment k}`` over ``samples`` cut to ``max_segments`` segments, for
    ``score(input_ids, attention_mask)`` (:func:`loss_by_segment` or :func:`full_attention_loss_by_segment` with
    their model bound). A batch holds samples of one segment count, so that every sample has tokens in every
    segment it is read at. Ranks split each count's samples in equal shares (a share longer than the samples
    wraps around, so all ranks run as many forwards) and sum their totals: every rank returns the same numbers."""
    samples = [lm_prefix(s, max_segments * segment_size) for s in samples]
    counts = [whole_segments([s], segment_size) for s in samples]
    totals = torch.zeros(max(counts), 2, dtype=torch.float64)
    for count in sorted(set(counts)):
        group = [s for s, c in zip(samples, counts) if c == count]
        mine = [group[i % len(group)] for i in eval_indices(len(group), rank, world_size)]
        for start in range(0, len(mine), batch_size):
            batch = collate_lm(mine[start : start + batch_size], pad_id, count * segment_size)
            totals[:count] += score(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
    if dist.is_initialized() and world_size > 1:
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return {k: loss / targets if targets else math.nan for k, (loss, targets) in enumerate(totals.tolist(), 1)}


def segment_report(
    model,
    twin,
    samples: Sequence[TaskSample],
    max_segments: int,
    *,
    batch_size: int,
    pad_id: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict:
    """The loss and perplexity of each segment of ``samples`` for the memory model, its no-memory ``twin`` (each
    segment alone) and full attention (the twin's backbone over the last ``twin.spec.max_positions`` tokens ending
    at the segment: the whole prefix while it fits, see ``beyond_reach``)."""
    segment_size, reach = model.config.segment_size, twin.spec.max_positions
    scores = {
        model.config.model_type if model.config.num_mem_tokens else "memory model": partial(loss_by_segment, model),
        "twin": partial(loss_by_segment, twin),
        "full attention": partial(full_attention_loss_by_segment, twin.backbone, reach=reach),
    }
    settings = dict(segment_size=segment_size, batch_size=batch_size, pad_id=pad_id, rank=rank,
                    world_size=world_size, device=device)  # fmt: skip
    losses = {
        name: evaluate_by_segment(partial(score, segment_size=segment_size), samples, max_segments, **settings)
        for name, score in scores.items()
    }
    segments = list(losses["twin"])
    return {
        "segment_size": segment_size,
        "samples": len(samples),
        "segments": segments,
        "loss": {name: [by_segment[k] for k in segments] for name, by_segment in losses.items()},
        "perplexity": {name: [math.exp(by_segment[k]) for k in segments] for name, by_segment in losses.items()},
        "full_attention_reach": reach,
        # full attention sees fewer tokens than the memory model has read from these segments on
        "beyond_reach": [k for k in segments if k * segment_size > reach],
    }
