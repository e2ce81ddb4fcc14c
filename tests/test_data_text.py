"""Documents to lm shards: every input format, both layouts and their counts, the shards read back token for
token, and bad input named with its file (exit 2)."""

from __future__ import annotations

import glob
import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from rmt_scale.cli.make_shards import main as make_shards
from rmt_scale.data import (
    Document,
    DocumentError,
    LMCounts,
    ShardStream,
    build_word_tokenizer,
    iter_documents,
    lm_prefix,
    lm_samples,
    load_tokenizer,
)

# real reStructuredText from Debian's python3-doc (tools/install_system_packages.sh installs it)
PYTHON_DOCS = sorted(glob.glob("/usr/share/doc/python3-doc/html/_sources/library/os*.txt"))[:3]


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_every_input_format_gives_its_documents_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"body": "second", "n": 1}\n\n{"body": "third"}\n')
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"body": "fourth"}\n')
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("fifth")
    write_tar(tmp_path / "e.tar", {"x1.txt": b"sixth", "x1.json": b"{}", "x2.txt": b"seventh"})
    documents = list(
        iter_documents([str(tmp_path / "*.txt"), str(tmp_path / "{b,c}.jsonl*"), str(tmp_path / "[de].*")], "body")
    )
    assert [d.text for d in documents] == ["first document", "second", "third", "fourth", "fifth", "sixth", "seventh"]
    assert documents[2].source == f"{tmp_path}/b.jsonl line 3"
    assert documents[6].source == f"{tmp_path}/e.tar member x2.txt"


def test_packed_shards_hold_the_documents_back_to_back_with_eos(tmp_path):
    tokenizer = build_word_tokenizer()
    out = tmp_path / "shards"
    assert make_shards(["--task", "lm", "--inputs", *PYTHON_DOCS, "--tokens", "256", "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    expected = np.concatenate(
        [np.append(tokenizer.encode(open(path, encoding="utf-8").read()), tokenizer.eos_id) for path in PYTHON_DOCS]
    )
    written = len(expected) // 256
    assert index["task"] == "lm" and index["layout"] == "pack"
    assert index["documents"] == len(PYTHON_DOCS) and index["documents_dropped"] == 0
    assert index["document_tokens"] == len(expected) - len(PYTHON_DOCS)
    assert index["total_samples"] == written and index["sample_tokens"] == written * 256
    assert index["tokens_dropped"] == len(expected) - written * 256
    stream = ShardStream(str(out), shuffle=False, vocab_size=tokenizer.vocab_size)
    samples = list(stream)
    assert {s.task for s in samples} == {"lm"} and {len(s.answer) for s in samples} == {0}
    np.testing.assert_array_equal(np.concatenate([s.tokens for s in samples]), expected[: written * 256])
    assert samples[0].meta["source"] == PYTHON_DOCS[0]
    # the tokenizer travels with the shards
    assert load_tokenizer(str(out / "tokenizer")).fingerprint == tokenizer.fingerprint


def test_whole_layout_cuts_long_documents_and_drops_and_counts_short_ones():
    tokenizer = build_word_tokenizer()
    texts = ["the river " * 30, "the lamp", "the old road " * 3]  # 60, 2 and 9 tokens
    documents = [Document(f"doc{i}", text) for i, text in enumerate(texts)]
    counts = LMCounts()
    samples = list(lm_samples(documents, tokenizer, 40, layout="whole", min_tokens=5, counts=counts))
    assert [len(s.tokens) for s in samples] == [40, 9] and [s.meta["source"] for s in samples] == ["doc0", "doc2"]
    assert counts == LMCounts(
        documents=3, documents_dropped=1, document_tokens=71, tokens_dropped=20 + 2, sample_tokens=49
    )
    np.testing.assert_array_equal(samples[1].tokens, tokenizer.encode(texts[2]))
    assert lm_prefix(samples[0], 16).tokens.tolist() == samples[0].tokens[:16].tolist()
    with pytest.raises(DocumentError, match="all 3 documents are shorter than --min-tokens 100"):
        list(lm_samples(documents, tokenizer, 200, layout="whole", min_tokens=100))


@pytest.mark.parametrize(
    "name, data, flags, message",
    [
        ("latin1.txt", "café".encode("latin-1"), [], "latin1.txt is not UTF-8 text (invalid byte at offset 3)"),
        ("empty.txt", b" \n", [], "empty.txt is empty"),
        ("docs.jsonl", b'{"text": "a"}\n{"body": "b"}\n', [], "docs.jsonl line 2 has no text field 'text': pass"),
        ("docs.jsonl", b'{"text": "a"\n', [], "docs.jsonl line 1 is not JSON"),
        ("notes.md", b"# notes", [], "notes.md is neither .txt, .jsonl"),
        ("short.txt", b"one two", ["--layout", "whole"], "all 1 documents are shorter than --min-tokens 32"),
        ("short.txt", b"one two", [], "hold 2 tokens, fewer than one sample of --tokens 64"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_file_and_the_fix(tmp_path, capsys, name, data, flags, message):
    (tmp_path / name).write_bytes(data)
    argv = ["--task", "lm", "--inputs", str(tmp_path / name), "--tokens", "64", "--out", str(tmp_path / "out"), *flags]
    assert make_shards(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error


def test_lm_flags_are_checked_before_any_file_is_read(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert make_shards(["--task", "lm", "--tokens", "64", "--out", out]) == 2
    assert "pass --inputs" in capsys.readouterr().err
    assert make_shards(["--task", "lm", "--inputs", "x.txt", "--tokens", "64", "128", "--out", out]) == 2
    assert "one --tokens value" in capsys.readouterr().err
    assert make_shards(["--task", "lm", "--inputs", str(tmp_path / "none*.txt"), "--tokens", "64", "--out", out]) == 2
    assert "no files match" in capsys.readouterr().err
    assert make_shards(["--task", "memorize", "--tokens", "64", "--out", out]) == 2
    assert "needs --samples" in capsys.readouterr().err


def test_a_character_budget_reads_a_text_file_only_as_far_as_it_reaches(tmp_path):
    text = "Über den Fluss. " * 100  # two-byte characters, so a byte cut may fall inside one
    (tmp_path / "book.txt").write_text(text)
    (tmp_path / "more.txt").write_text("never read")
    for budget in (1, 7, 17, 1000):
        documents = list(iter_documents([str(tmp_path / "book.txt"), str(tmp_path / "more.txt")], max_chars=budget))
        assert [d.text for d in documents] == [text[:budget]]
    documents = list(iter_documents([str(tmp_path / "book.txt"), str(tmp_path / "more.txt")], max_chars=len(text) + 3))
    assert [d.text for d in documents] == [text, "nev"]
