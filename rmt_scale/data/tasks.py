"""The long-context tasks of the RMT papers: facts hidden in background text, the question at the end.

- ``memorize``: one qa1 fact at the very start of the context.
- ``detect``:   one qa1 fact at a uniformly random sentence boundary.
- ``reason``:   a qa2 story (or qa3 with ``story="qa3"``), each fact at its own random sentence boundary.

Length semantics: ``len(sample.tokens) + len(sample.answer) == num_tokens`` exactly, so asking for
``k * segment_size`` gives exactly ``k`` full segments once the answer is appended
(:func:`.batching.collate`). Background fills whatever the facts, question and answer leave; the last
background sentence may be cut short right before the question. Facts are never split and keep their
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .babi import Story, make_story
from .background import Background, default_background
from .tokenizer import TextTokenizer

TASKS = ("memorize", "detect", "reason")
_DEFAULT_STORY = {"memorize": "qa1", "detect": "qa1", "reason": "qa2"}


@dataclass
class TaskSample:
    task: str
    tokens: np.ndarray  # int32: background + facts + question, the whole context the model reads
    answer: np.ndarray  # int32: answer token ids, the target
    question: str
    answer_text: str
    facts: list[str]
    fact_positions: np.ndarray  # int64: token offset of each fact's first token within ``tokens``
    fact_lengths: np.ndarray  # int64: tokens per fact
    num_tokens: int  # len(tokens) + len(answer)
    meta: dict = field(default_factory=dict)  # anything else worth keeping (story kind, seed, ...)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _fact_offsets(task: str, rng: np.random.Generator, boundaries: np.ndarray, num_facts: int) -> np.ndarray:
    """Background offsets (sentence boundaries) before which each fact goes, non-decreasing."""
    if task == "memorize":
        return np.zeros(num_facts, dtype=np.int64)
    total = boundaries[-1]
    wanted = np.sort(rng.integers(0, total + 1, size=num_facts))
    # Snap each uniformly drawn offset to the nearest sentence boundary so no sentence is split.
    right = np.clip(np.searchsorted(boundaries, wanted), 0, len(boundaries) - 1)
    left = np.clip(right - 1, 0, None)
    nearer_left = (wanted - boundaries[left]) <= (boundaries[right] - wanted)
    return np.where(nearer_left, boundaries[left], boundaries[right])


def _story_ids(kind: str, rng: np.random.Generator, story_facts: int | None, tokenizer: TextTokenizer):
    """A sample's story (its first draws of ``rng``) and the ids of its facts, question and answer."""
    tale: Story = make_story(kind, rng, story_facts)
    fact_ids = tokenizer.encode_batch(list(tale.facts))
    question_ids, answer_ids = tokenizer.encode_batch([tale.question, tale.answer])
    return tale, fact_ids, question_ids, answer_ids


def make_sample(
    task: str,
    num_tokens: int,
    seed,
    tokenizer: TextTokenizer,
    background: Background | None = None,
    *,
    story: str | None = None,
    story_facts: int | None = None,
) -> TaskSample:
    """One sample of ``task`` whose context plus answer is exactly ``num_tokens`` tokens.

    ``seed`` is an int (or a ``np.random.Generator``); the same seed, tokenizer and background always
    give the same sample. ``story`` overrides the bAbI story kind (qa1/qa2/qa3) and ``story_facts`` adds
    distractor facts to the story (all of them are placed like the supporting ones).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    rng = _rng(seed)
    background = default_background(tokenizer) if background is None else background
    kind = story or _DEFAULT_STORY[task]
    tale, fact_ids, question_ids, answer_ids = _story_ids(kind, rng, story_facts, tokenizer)
    fact_lengths = np.array([len(f) for f in fact_ids], dtype=np.int64)
    fixed = int(fact_lengths.sum()) + len(question_ids) + len(answer_ids)
    if num_tokens < fixed:
        raise ValueError(
            f"num_tokens={num_tokens} is too small for task {task!r}: its facts, question and "
            f"answer alone take {fixed} tokens; ask for at least {fixed}"
        )

    filler, boundaries = background.window(rng, num_tokens - fixed)
    offsets = _fact_offsets(task, rng, boundaries, len(fact_ids))
    pieces, cursor = [], 0
    for offset, ids in zip(offsets, fact_ids):
        pieces += [filler[cursor:offset], ids]
        cursor = offset
    pieces += [filler[cursor:], question_ids]
    tokens = np.concatenate(pieces).astype(np.int32, copy=False)
    # Each fact lands after its background offset plus all earlier facts.
    positions = offsets + np.concatenate([[0], np.cumsum(fact_lengths)[:-1]])
    return TaskSample(
        task=task,
        tokens=tokens,
        answer=answer_ids.astype(np.int32),
        question=tale.question,
        answer_text=tale.answer,
        facts=list(tale.facts),
        fact_positions=positions.astype(np.int64),
        fact_lengths=fact_lengths,
        num_tokens=num_tokens,
        meta={"story": kind, "supporting": list(tale.supporting)},
    )


class TaskGenerator:
    """Holds a tokenizer and a pre-tokenized background; ``sample(i)`` is deterministic in (seed, i)."""

    def __init__(
        self,
        task: str,
        tokenizer: TextTokenizer,
        background: Background | None = None,
        *,
        seed: int = 0,
        story: str | None = None,
        story_facts: int | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.background = default_background(tokenizer) if background is None else background
        self.story, self.story_facts = story, story_facts

    def min_tokens(self, index: int) -> int:
        """The fewest tokens sample ``index`` can have (its facts, question and answer, without background): a
        tool asking for many samples can check every length before it writes any."""
        kind = self.story or _DEFAULT_STORY[self.task]
        _, fact_ids, question_ids, answer_ids = _story_ids(
            kind, np.random.default_rng([self.seed, index]), self.story_facts, self.tokenizer
        )
        return sum(map(len, fact_ids)) + len(question_ids) + len(answer_ids)

    def sample(self, index: int, num_tokens: int) -> TaskSample:
        sample = make_sample(
            self.task,
            num_tokens,
            np.random.default_rng([self.seed, index]),
            self.tokenizer,
            self.background,
            story=self.story,
            story_facts=self.story_facts,
        )
        sample.meta.update(seed=self.seed, index=index)
        return sample
