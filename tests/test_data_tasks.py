"""bAbI stories, background, tokenizers and long-context task samples, checked with real parts."""

import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rmt_scale.data import (
    ACTORS,
    LOCATIONS,
    OBJECTS,
    Background,
    TaskGenerator,
    build_word_tokenizer,
    default_background,
    filler_sentences,
    load_tokenizer,
    make_sample,
    make_story,
)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()


def simulate(facts):
    """Independent world simulation: where every actor is, who holds what, every object's location history."""
    actor_at, holder, history = {}, {}, {o: [] for o in OBJECTS}
    for fact in facts:
        actor = fact.split()[0]
        if m := re.search(r"(went to|journeyed to|travelled to|moved to|went back to) the (\w+)\.$", fact):
            actor_at[actor] = m.group(2)
            for obj, who in holder.items():
                if who == actor:
                    history[obj].append(m.group(2))
        elif m := re.search(r"(got|took|grabbed|picked up) the (\w+)( there)?\.$", fact):
            holder[m.group(2)] = actor
            if actor in actor_at:
                history[m.group(2)].append(actor_at[actor])
        elif m := re.search(r"(dropped|discarded|put down|left) the (\w+)( there)?\.$", fact):
            assert holder.pop(m.group(2)) == actor, fact
        else:
            raise AssertionError(f"unparsable fact {fact!r}")
    return actor_at, history


@pytest.mark.parametrize("kind", ["qa1", "qa2", "qa3"])
@pytest.mark.parametrize("num_facts", [None, 8])
def test_story_answers_match_a_world_simulation(kind, num_facts):
    for seed in range(200):
        story = make_story(kind, np.random.default_rng(seed), num_facts)
        assert len(story.facts) == (num_facts or {"qa1": 1, "qa2": 2, "qa3": 3}[kind])
        actor_at, history = simulate(story.facts)
        if kind == "qa1":
            assert story.answer == actor_at[re.match(r"Where is (\w+)\?", story.question).group(1)]
        elif kind == "qa2":
            assert story.answer == history[re.match(r"Where is the (\w+)\?", story.question).group(1)][-1]
        else:
            obj, later = re.match(r"Where was the (\w+) before the (\w+)\?", story.question).groups()
            assert history[obj][-2:] == [story.answer, later]
        assert story.answer in LOCATIONS


def test_story_errors():
    with pytest.raises(ValueError, match="unknown story kind 'qa9'"):
        make_story("qa9", np.random.default_rng(0))
    with pytest.raises(ValueError, match="qa3 needs at least 3 facts"):
        make_story("qa3", np.random.default_rng(0), num_facts=2)


def test_builtin_tokenizer_covers_everything_and_round_trips(tok, tmp_path):
    assert tok.vocab_size < 1000
    unk = tok.hf.unk_token_id
    assert not (default_background(tok).tokens == unk).any()
    for word in ACTORS + LOCATIONS + OBJECTS:
        assert len(tok.encode(word)) == 1 and tok.encode(word)[0] != unk
    tok.save(str(tmp_path))
    from transformers import AutoTokenizer

    text = "Mary went back to the kitchen. Where is Mary?"
    assert AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"] == tok.encode(text).tolist()
    assert load_tokenizer(str(tmp_path)).encode(text).tolist() == tok.encode(text).tolist()
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    for builtin in ("builtin", None):
        assert load_tokenizer(builtin).hf.get_vocab() == tok.hf.get_vocab()


def test_builtin_background_never_mentions_babi_entities():
    words = set(" ".join(filler_sentences(2000)).lower().replace(".", " ").replace(",", " ").split())
    assert not words & {w.lower() for w in ACTORS + LOCATIONS + OBJECTS + ("went", "journeyed", "travelled")}


@pytest.mark.parametrize("task", ["memorize", "detect", "reason"])
@pytest.mark.parametrize("num_tokens", [60, 512, 4096, 100_003])
def test_sample_has_exact_length_facts_in_order_and_question_last(tok, task, num_tokens):
    sample = make_sample(task, num_tokens, seed=num_tokens, tokenizer=tok)
    assert len(sample.tokens) + len(sample.answer) == sample.num_tokens == num_tokens
    assert sample.tokens.dtype == np.int32 and sample.answer.dtype == np.int32
    assert len(sample.facts) == (2 if task == "reason" else 1)
    assert np.all(np.diff(sample.fact_positions) >= sample.fact_lengths[:-1])  # in order, never overlapping
    for fact, pos, length in zip(sample.facts, sample.fact_positions, sample.fact_lengths):
        assert sample.tokens[pos : pos + length].tolist() == tok.encode(fact).tolist()
    question = tok.encode(sample.question)
    assert sample.tokens[-len(question) :].tolist() == question.tolist()
    assert tok.decode(sample.answer) == sample.answer_text and len(sample.answer) == 1
    if task == "memorize":
        assert sample.fact_positions[0] == 0


def test_detect_places_facts_uniformly_at_sentence_boundaries(tok):
    period = tok.encode(".")[0]
    positions = []
    for seed in range(300):
        sample = make_sample("detect", 2000, seed, tok)
        pos = sample.fact_positions[0]
        assert pos == 0 or sample.tokens[pos - 1] == period  # right after a background sentence
        positions.append(pos / 2000)
    assert 0.4 < np.mean(positions) < 0.6 and np.min(positions) < 0.1 and np.max(positions) > 0.85


def test_reason_qa3_places_three_facts(tok):
    sample = make_sample("reason", 3000, 5, tok, story="qa3", story_facts=5)
    assert len(sample.facts) == 5 and len(sample.fact_positions) == 5
    assert sample.question.startswith("Where was the")


def test_same_seed_same_sample_and_different_seed_differs(tok):
    a, b = make_sample("reason", 5000, 7, tok), make_sample("reason", 5000, 7, tok)
    c = make_sample("reason", 5000, 8, tok)
    assert np.array_equal(a.tokens, b.tokens) and a.facts == b.facts
    assert not np.array_equal(a.tokens, c.tokens)
    gen = TaskGenerator("detect", tok, seed=3)
    assert np.array_equal(gen.sample(4, 999).tokens, TaskGenerator("detect", tok, seed=3).sample(4, 999).tokens)


def test_minimum_length_and_bad_input(tok):
    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        make_sample("summarize", 100, 0, tok)
    with pytest.raises(ValueError, match=r"too small.*ask for at least \d+"):
        make_sample("reason", 8, 0, tok)
    minimum = int(re.search(r"at least (\d+)", _error(lambda: make_sample("memorize", 1, 0, tok))).group(1))
    sample = make_sample("memorize", minimum, 0, tok)  # no background at all still works
    assert len(sample.tokens) + len(sample.answer) == minimum
    with pytest.raises(ValueError, match="no text to use as background"):
        Background.from_text("   \n ", tok)


def _error(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def test_ten_million_token_sample_wraps_the_background(tok):
    """~40x the built-in background: the background repeats, and the facts and question stay intact.
    (How fast samples are made is measured by tools/bench_data.py, not here.)"""
    gen = TaskGenerator("reason", tok)
    background = gen.background.tokens
    big = gen.sample(1, 10_000_000)
    assert len(big.tokens) + len(big.answer) == 10_000_000
    for fact, pos, length in zip(big.facts, big.fact_positions, big.fact_lengths):
        assert big.tokens[pos : pos + length].tolist() == tok.encode(fact).tolist()
    question = tok.encode(big.question)
    assert big.tokens[-len(question) :].tolist() == question.tolist()
    # a stretch of background far past its first pass is a stretch of the background text
    start = 9 * len(background) + 12_345
    stretch = big.tokens[start : start + 1000]
    facts_span = [(p, p + n) for p, n in zip(big.fact_positions, big.fact_lengths)]
    assert all(end <= start or p >= start + 1000 for p, end in facts_span)
    assert _contains(np.concatenate([background, background]), stretch)


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == needle).all(axis=1).any())


def test_user_text_files_and_any_hf_tokenizer(tmp_path):
    """A BPE tokenizer saved as an HF directory, and background from the user's own text file."""
    from transformers import PreTrainedTokenizerFast

    corpus = filler_sentences(500) + [f"{a} went to the {place}." for a in ACTORS for place in LOCATIONS]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(str(tmp_path / "bpe"))
    tok = load_tokenizer(str(tmp_path / "bpe"))

    book = tmp_path / "book.txt"
    book.write_text("It was a long winter.\nThe snow fell on the roofs\nall night. Nobody spoke! Why not?\n")
    background = Background.from_documents(str(book), tok)
    assert len(background.sentence_starts) == 4
    sample = make_sample("reason", 700, 2, tok, background)
    assert len(sample.tokens) + len(sample.answer) == 700
    for fact, pos, length in zip(sample.facts, sample.fact_positions, sample.fact_lengths):
        assert tok.decode(sample.tokens[pos : pos + length]).strip() == fact
    assert "snow fell on the roofs all night" in tok.decode(sample.tokens)
