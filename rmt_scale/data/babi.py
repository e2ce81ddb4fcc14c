"""bAbI-style stories for qa1 (one supporting fact), qa2 (two) and qa3 (three).

Written from the task rules, not from the original generator. Each story is a short, ordered list of fact
sentences, one question and a one-word answer (a location). Stories are built constructively: the
supporting facts are chosen first, and optional distractor facts only ever involve *other* actors and
objects, so the answer is correct by construction and never needs a world simulation to check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTORS = ("Mary", "John", "Sandra", "Daniel")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")

MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GET_VERBS = ("got", "took", "grabbed", "picked up")
DROP_VERBS = ("dropped", "discarded", "put down", "left")

STORY_KINDS = ("qa1", "qa2", "qa3")
# Supporting facts per story kind: the smallest story that still asks the question.
SUPPORTING_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3}

# Every word a story can contain, so a word-level tokenizer can cover them without seeing samples.
VOCABULARY = tuple(
    sorted(
        {w for phrase in ACTORS + LOCATIONS + OBJECTS + MOVE_VERBS + GET_VERBS + DROP_VERBS for w in phrase.split()}
        | {"the", "there", "where", "is", "was", "before"}
    )
)


@dataclass(frozen=True)
class Story:
    kind: str
    facts: tuple[str, ...]
    supporting: tuple[int, ...]  # indices into facts that the answer depends on
    question: str
    answer: str


def _pick(rng: np.random.Generator, options, exclude=()):
    choices = [o for o in options if o not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _move(rng, actor: str, location: str) -> str:
    return f"{actor} {_pick(rng, MOVE_VERBS)} the {location}."


def _get(rng, actor: str, obj: str) -> str:
    there = " there" if rng.random() < 0.5 else ""
    return f"{actor} {_pick(rng, GET_VERBS)} the {obj}{there}."


def _drop(rng, actor: str, obj: str) -> str:
    there = " there" if rng.random() < 0.5 else ""
    return f"{actor} {_pick(rng, DROP_VERBS)} the {obj}{there}."


def _distractors(rng, count: int, actor: str, obj: str | None) -> list[str]:
    """Facts about other actors and other objects: they never change the answer to the question."""
    others = [a for a in ACTORS if a != actor]
    free_objects = [o for o in OBJECTS if o != obj]
    held: dict[str, str] = {}  # object -> actor holding it, so drops are always of held objects
    facts = []
    for _ in range(count):
        who = _pick(rng, others)
        kind = rng.random()
        mine = [o for o, h in held.items() if h == who]
        if kind < 0.2 and mine:
            o = _pick(rng, mine)
            del held[o]
            facts.append(_drop(rng, who, o))
        elif kind < 0.4 and (untaken := [o for o in free_objects if o not in held]):
            o = _pick(rng, untaken)
            held[o] = who
            facts.append(_get(rng, who, o))
        else:
            facts.append(_move(rng, who, _pick(rng, LOCATIONS)))
    return facts


def _interleave(rng, supporting: list[str], distractors: list[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Merge distractors into the supporting facts at random places, keeping both orders."""
    n = len(supporting) + len(distractors)
    slots = set(rng.choice(n, size=len(supporting), replace=False).tolist())
    s, d = iter(supporting), iter(distractors)
    facts = tuple(next(s) if i in slots else next(d) for i in range(n))
    return facts, tuple(sorted(slots))


def make_story(kind: str, rng: np.random.Generator, num_facts: int | None = None) -> Story:
    """A story of ``num_facts`` facts (default: only the supporting ones) answering one question.

    qa1: "X went to L."                                   -> "Where is X?"             -> L
    qa2: "X got the O." "X went to L."                   -> "Where is the O?"         -> L
    qa3: "X got the O." "X went to A." "X went to B."    -> "Where was the O before the B?" -> A
    """
    if kind not in SUPPORTING_FACTS:
        raise ValueError(f"unknown story kind {kind!r}; choose one of {STORY_KINDS}")
    needed = SUPPORTING_FACTS[kind]
    num_facts = needed if num_facts is None else num_facts
    if num_facts < needed:
        raise ValueError(f"{kind} needs at least {needed} facts, got num_facts={num_facts}")

    actor = _pick(rng, ACTORS)
    obj = None if kind == "qa1" else _pick(rng, OBJECTS)
    first = _pick(rng, LOCATIONS)
    if kind == "qa1":
        supporting, question, answer = [_move(rng, actor, first)], f"Where is {actor}?", first
    elif kind == "qa2":
        supporting = [_get(rng, actor, obj), _move(rng, actor, first)]
        question, answer = f"Where is the {obj}?", first
    else:
        second = _pick(rng, LOCATIONS, exclude=(first,))
        supporting = [_get(rng, actor, obj), _move(rng, actor, first), _move(rng, actor, second)]
        question, answer = f"Where was the {obj} before the {second}?", first

    facts, support_idx = _interleave(rng, supporting, _distractors(rng, num_facts - needed, actor, obj))
    return Story(kind=kind, facts=facts, supporting=support_idx, question=question, answer=answer)
