"""The command-line tools, run as a user would run them."""

import json
import os
import subprocess
import sys

import numpy as np

from rmt_scale.data import ShardStream, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, check=True)


def test_make_shards_help_explains_every_flag():
    text = run_tool("tools/make_shards.py", "--help").stdout
    for flag in ("--task", "--tokens", "--samples", "--out", "--tokenizer", "--background", "--background-shards",
                 "--story", "--story-facts", "--shard-samples", "--shard-bytes", "--seed"):
        assert flag in text


def test_make_shards_writes_readable_shards_and_the_tokenizer(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("The rain came down on the harbour. The ship waited. " * 50)
    out = tmp_path / "out"
    run_tool("tools/make_shards.py", "--task", "reason", "--story", "qa3", "--tokens", "512", "1024",
             "--samples", "5", "--shard-samples", "2", "--seed", "3", "--out", str(out))
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1] and index["task"] == "reason"
    samples = list(ShardStream(str(out), shuffle=False))
    assert [len(s.tokens) + len(s.answer) for s in samples] == [512, 1024, 512, 1024, 512]
    tok = load_tokenizer(str(out / "tokenizer"))
    for s in samples:
        assert tok.decode(s.answer) == s.answer_text and len(s.facts) == 3

    run_tool("tools/make_shards.py", "--task", "detect", "--tokens", "300", "--samples", "1",
             "--background", str(book), "--out", str(tmp_path / "own"))
    (sample,) = ShardStream(str(tmp_path / "own"))
    assert "the ship waited" in tok.decode(sample.tokens)


def test_bench_prints_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    stdout = run_tool("tools/bench_data.py", "--tokens", "20000", "--samples", "4", "--passes", "1",
                      "--out", str(out)).stdout
    result = json.loads(out.read_text())
    assert "segment batches" in stdout and json.loads(stdout.strip().splitlines()[-1]) == result
    assert result["segment_batch_tokens_per_s"] > 0 and np.isfinite(result["generate_sample_s"])
