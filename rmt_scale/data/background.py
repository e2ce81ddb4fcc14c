"""Background text that hides the facts: a built-in offline filler, or the user's own text.

A background is tokenized once into one flat int32 array plus the offset of every sentence start, so a
sample of any length is a cheap slice of that array (wrapping around when the sample is longer than the
text) and facts can be dropped in between sentences.

The built-in filler is generated from a fixed grammar and word list written for this project. It never
uses the bAbI actors, locations, objects or motion verbs, so a fact always stands out from its
background by content, never by accident of wording. For realistic long-context runs, use real books
(e.g. PG19, as text files or as shards) through :meth:`Background.from_documents`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .documents import iter_documents

_NAMES = tuple(
    (
        "Elena, Tomas, Ravi, Ingrid, Omar, Lucia, Peter, Aiko, Nadia, Hugo, the old man, the captain, the "
        "girl, the stranger, the doctor, the farmer, her brother, his mother"
    ).split(", ")
)
_ADJECTIVES = tuple(
    (
        "quiet old bright narrow distant cold warm heavy pale green dark gentle strange broken silent small "
        "wide early late empty grey golden wet dry steep soft loud thin ancient restless"
    ).split()
)
_NOUNS = tuple(
    (
        "river village road forest hill window letter ship harbour market bridge lamp field storm wind cart "
        "horse bell tower book coat door path stone boat song fire winter valley crowd train station table "
        "candle mountain shore cloud wall orchard lake chapel mill well gate"
    ).split()
)
_VERBS = tuple(
    (
        "watched, crossed, carried, followed, remembered, painted, passed, opened, closed, found, lost, "
        "mended, described, ignored, admired, studied, visited, counted, noticed, pulled, pushed, wrote "
        "about, spoke of, waited by, leaned on, sang about"
    ).split(", ")
)
_INTRANSITIVE = tuple(
    "shone faded trembled slept waited grew burned rang drifted rested sank rose glowed turned settled".split()
)
_ADVERBS = tuple(
    (
        "slowly, quietly, again, at last, without a word, for a while, once more, suddenly, carefully, in "
        "silence, all day, before dawn, after supper, every morning"
    ).split(", ")
)
_PREPOSITIONS = ("near", "beyond", "under", "behind", "across", "beside", "above", "along")
_TIMES = ("morning", "evening", "night", "afternoon", "spring", "autumn", "summer", "hour", "season")
_TEMPLATES = (
    "{Name} {verb} the {adj} {noun} {adverb}.",
    "The {adj} {noun} {intransitive} {prep} the {noun2}.",
    "In the {time}, {name} {verb} the {noun} {prep} the {adj} {noun2}.",
    "It was a {adj} {time}, and the {noun} was {adj2}.",
    "{Name} said that the {noun} {intransitive} {adverb}.",
    "Nobody {verb} the {noun} {prep} the {noun2}, and the {adj} {time} {intransitive}.",
    "The {noun} {intransitive} {adverb} while {name} {verb} the {adj} {noun2}.",
)

# Every word the filler can produce, for the built-in word-level tokenizer's vocabulary.
FILLER_VOCABULARY = tuple(
    sorted(
        {
            w.lower()
            for group in (
                _NAMES,
                _ADJECTIVES,
                _NOUNS,
                _VERBS,
                _INTRANSITIVE,
                _ADVERBS,
                _PREPOSITIONS,
                _TIMES,
                _TEMPLATES,
            )
            for phrase in group
            for w in re.findall(r"[A-Za-z]+", phrase)
            if w
            not in ("Name", "name", "verb", "adj", "adj2", "noun", "noun2", "adverb", "intransitive", "prep", "time")
        }
    )
)

DEFAULT_FILLER_SENTENCES = 20_000  # ~270k tokens with the built-in tokenizer: long enough to rarely repeat
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def filler_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` grammatical filler sentences drawn from the fixed grammar, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)

    def pick(options):
        return options[int(rng.integers(len(options)))]

    sentences = []
    for _ in range(count):
        name = pick(_NAMES)
        words = dict(
            name=name,
            Name=name[0].upper() + name[1:],
            verb=pick(_VERBS),
            adj=pick(_ADJECTIVES),
            adj2=pick(_ADJECTIVES),
            noun=pick(_NOUNS),
            noun2=pick(_NOUNS),
            adverb=pick(_ADVERBS),
            intransitive=pick(_INTRANSITIVE),
            prep=pick(_PREPOSITIONS),
            time=pick(_TIMES),
        )
        sentence = pick(_TEMPLATES).format(**words)
        sentences.append(sentence[0].upper() + sentence[1:])
    return sentences


def split_sentences(text: str) -> list[str]:
    """Sentences of free text; line breaks (e.g. the hard wraps of PG19 books) count as spaces."""
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def _names(urls: str | Iterable[str]) -> str:
    return urls if isinstance(urls, str) else ", ".join(urls)


@dataclass(frozen=True)
class Background:
    tokens: np.ndarray  # int32, all sentences back to back
    sentence_starts: np.ndarray  # int64 token offsets where a sentence begins; starts with 0

    @classmethod
    def from_sentences(cls, sentences: Sequence[str], tokenizer, source: str = "background") -> Background:
        encoded = [ids for ids in tokenizer.encode_batch(list(sentences)) if len(ids)]
        if not encoded:
            raise ValueError(f"{source} has no text to use as background: give non-empty text files.")
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return cls(tokens=np.concatenate(encoded).astype(np.int32), sentence_starts=starts)

    @classmethod
    def from_text(cls, text: str, tokenizer, source: str = "text") -> Background:
        return cls.from_sentences(split_sentences(text), tokenizer, source)

    @classmethod
    def from_documents(
        cls, urls: str | Sequence[str], tokenizer, max_chars: int | None = None, text_field: str = "text"
    ) -> Background:
        """The text of documents from any fsspec URL (globs and brace patterns allowed; ``.txt``, ``.jsonl``, either
        gzipped, or webdataset shards of ``.txt`` members, as :mod:`.documents` reads them), in order, up to
        ``max_chars`` characters. Unreadable input raises :class:`.documents.DocumentError`."""
        texts = [document.text for document in iter_documents(urls, text_field, max_chars)]
        return cls.from_text("\n".join(texts)[:max_chars], tokenizer, source=_names(urls))

    def window(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``length`` background tokens starting at a random sentence, and the sentence starts inside them.

        Longer windows than the text wrap around to its beginning. The returned offsets include 0 and every
        sentence start up to and including ``length`` (a fact may go right before the question).
        """
        n = len(self.tokens)
        start = int(self.sentence_starts[rng.integers(len(self.sentence_starts))])
        # np.resize repeats its input cyclically: exactly the wrap-around we want, without an index array.
        tokens = np.resize(np.concatenate([self.tokens[start:], self.tokens[:start]]), length)
        laps = (start + length) // n + 1
        starts = (self.sentence_starts[None, :] + n * np.arange(laps)[:, None]).ravel() - start
        starts = starts[(starts >= 0) & (starts <= length)]
        return tokens, np.union1d(starts, [length])


@lru_cache(maxsize=4)
def _cached_default(tokenizer) -> Background:
    return Background.from_sentences(filler_sentences(DEFAULT_FILLER_SENTENCES), tokenizer, "built-in filler")


def default_background(tokenizer) -> Background:
    """The built-in filler background, tokenized once per tokenizer and cached."""
    return _cached_default(tokenizer)
