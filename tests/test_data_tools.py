"""The command-line tools, run as a user would run them."""

import json
import os
import subprocess
import sys

from rmt_scale.data import ShardStream, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, check=True)


def test_make_shards_help_explains_every_flag():
    text = run_tool("tools/make_shards.py", "--help").stdout
    for flag in (
        "--task",
        "--tokens",
        "--samples",
        "--out",
        "--tokenizer",
        "--background",
        "--text-field",
        "--story",
        "--story-facts",
        "--shard-samples",
        "--shard-bytes",
        "--seed",
    ):
        assert flag in text


def test_make_shards_writes_readable_shards_and_the_tokenizer(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("The rain came down on the harbour. The ship waited. " * 50)
    out = tmp_path / "out"
    run_tool(
        "tools/make_shards.py",
        "--task",
        "reason",
        "--story",
        "qa3",
        "--tokens",
        "512",
        "1024",
        "--samples",
        "5",
        "--shard-samples",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1] and index["task"] == "reason"
    samples = list(ShardStream(str(out), shuffle=False))
    assert [len(s.tokens) + len(s.answer) for s in samples] == [512, 1024, 512, 1024, 512]
    tok = load_tokenizer(str(out / "tokenizer"))
    for s in samples:
        assert tok.decode(s.answer) == s.answer_text and len(s.facts) == 3

    run_tool(
        "tools/make_shards.py",
        "--task",
        "detect",
        "--tokens",
        "300",
        "--samples",
        "1",
        "--background",
        str(book),
        "--out",
        str(tmp_path / "own"),
    )
    (sample,) = ShardStream(str(tmp_path / "own"))
    assert "the ship waited" in tok.decode(sample.tokens)


def test_bench_streams_every_token_and_reports_it(tmp_path):
    """5 samples of 20,000 tokens in batches of 2: the reader delivers all 100,000 tokens, the segment
    batches the 80,000 of the two full batches (the incomplete last batch is dropped)."""
    out = tmp_path / "bench.json"
    stdout = run_tool(
        "tools/bench_data.py",
        "--tokens",
        "20000",
        "--samples",
        "5",
        "--batch-size",
        "2",
        "--segment-size",
        "512",
        "--passes",
        "2",
        "--out",
        str(out),
    ).stdout
    result = json.loads(out.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == result
    assert (result["read_tokens"], result["segment_batch_tokens"]) == (5 * 20_000, 2 * 2 * 20_000)
    rows = [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "built-in background, tokenize once",
        "generate one 20,000-token sample",
        "encode + write one sample to a shard",
        "stream shards -> samples",
        "stream shards -> batches of 2, padded to 512-token segments",
    ]
