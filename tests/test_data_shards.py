"""Shards on disk and over fsspec: write, read back, HTTP, rank/worker splits, resume, corruption."""

import functools
import http.server
import io
import json
import logging
import pickle
import tarfile
import threading

import numpy as np
import pytest
from torch.utils.data import DataLoader

from rmt_scale.data import (
    CorruptShardError,
    ShardStream,
    TaskGenerator,
    build_word_tokenizer,
    check_shard_tokenizer,
    iter_tar_samples,
    tokenizer_index_fields,
    write_shards,
)

NUM_SAMPLES = 11


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def samples(tok):
    gen = TaskGenerator("reason", tok, seed=1)
    return [gen.sample(i, 200 + 37 * i) for i in range(NUM_SAMPLES)]


@pytest.fixture(scope="module")
def shard_dir(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(samples, str(out), max_samples=3)  # 4 shards of 3, 3, 3, 2 samples
    return out


def ids(stream_or_samples):
    return [s.meta["index"] for s in stream_or_samples]


def test_written_shards_are_plain_webdataset_tars(shard_dir):
    index = json.loads((shard_dir / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 2] and index["total_samples"] == NUM_SAMPLES
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        assert tar.getnames() == [
            f"00000000{i}.{f}" for i in range(3) for f in ("answer.npy", "meta.json", "tokens.npy")
        ]
    import webdataset as wds  # webdataset itself reads them

    first = next(iter(wds.WebDataset(str(shard_dir / "shard-000000.tar"), shardshuffle=False)))
    assert first["__key__"] == "000000000" and set(first) >= {"tokens.npy", "answer.npy", "meta.json"}


def test_read_back_equals_what_was_written(shard_dir, samples):
    read = list(ShardStream(str(shard_dir), shuffle=False))
    assert len(read) == NUM_SAMPLES
    for got, want in zip(read, samples):
        assert np.array_equal(got.tokens, want.tokens) and got.tokens.dtype == np.int32
        assert np.array_equal(got.answer, want.answer)
        assert np.array_equal(got.fact_positions, want.fact_positions)
        assert (got.task, got.question, got.answer_text, got.facts, got.num_tokens) == (
            want.task,
            want.question,
            want.answer_text,
            want.facts,
            want.num_tokens,
        )


def test_memory_and_file_urls(samples, shard_dir):
    write_shards(samples[:4], "memory://shards-test", max_samples=2)
    assert ids(ShardStream("memory://shards-test", shuffle=False)) == [0, 1, 2, 3]
    assert ids(ShardStream(f"file://{shard_dir}", shuffle=False)) == list(range(NUM_SAMPLES))
    # Brace patterns without an index: counts come from reading the shards once.
    stream = ShardStream(f"{shard_dir}/shard-{{000000..000003}}.tar", shuffle=False)
    assert stream.counts == [3, 3, 3, 2] and ids(stream) == list(range(NUM_SAMPLES))


def test_streams_over_a_local_http_server(shard_dir):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(shard_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        stream = ShardStream(f"http://127.0.0.1:{server.server_port}/", world_size=2, rank=1, shuffle=False)
        assert ids(stream) == [5, 6, 7, 8, 9]
    finally:
        server.shutdown()
        thread.join()


def rank_samples(shard_dir, rank, world_size, num_workers, epoch=0, seed=0):
    stream = ShardStream(str(shard_dir), rank=rank, world_size=world_size, seed=seed)
    stream.set_epoch(epoch)
    if num_workers == 0:
        return list(stream)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return list(loader)


def test_two_ranks_two_workers_get_equal_disjoint_shares(shard_dir):
    per_rank = [rank_samples(shard_dir, r, 2, num_workers=2) for r in range(2)]
    assert [len(p) for p in per_rank] == [NUM_SAMPLES // 2] * 2
    seen = ids(per_rank[0]) + ids(per_rank[1])
    assert len(set(seen)) == 10 and set(seen) <= set(range(NUM_SAMPLES))  # one sample dropped this epoch
    # Worker count never changes what a rank sees, nor the order.
    for r in range(2):
        assert ids(rank_samples(shard_dir, r, 2, num_workers=0)) == ids(per_rank[r])
        assert [s.meta["position"] for s in per_rank[r]] == list(range(5))


def test_uneven_shards_still_give_equal_counts_on_three_ranks(shard_dir):
    counts = [len(rank_samples(shard_dir, r, 3, num_workers=0)) for r in range(3)]
    assert counts == [3, 3, 3]


def test_shard_order_shuffles_per_epoch_and_is_seeded(shard_dir):
    epoch0 = ids(rank_samples(shard_dir, 0, 1, 0, epoch=0))
    assert epoch0 == ids(rank_samples(shard_dir, 0, 1, 0, epoch=0))
    orders = {tuple(ids(rank_samples(shard_dir, 0, 1, 0, epoch=e))) for e in range(6)}
    assert len(orders) > 1 and all(sorted(o) == list(range(NUM_SAMPLES)) for o in orders)


def test_in_process_iteration_advances_epochs(shard_dir):
    stream = ShardStream(str(shard_dir))
    first, second = ids(stream), ids(stream)
    assert stream.state_dict()["epoch"] == 2 and first == ids(rank_samples(shard_dir, 0, 1, 0, epoch=0))
    assert second == ids(rank_samples(shard_dir, 0, 1, 0, epoch=1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_at_exactly_the_next_sample(shard_dir, num_workers):
    full = rank_samples(shard_dir, 1, 2, num_workers, epoch=3)
    stream = ShardStream(str(shard_dir), rank=1, world_size=2)
    stream.set_epoch(3)
    consumed = []
    for sample in DataLoader(stream, batch_size=None, num_workers=num_workers) if num_workers else stream:
        consumed.append(sample)
        if len(consumed) == 2:
            break
    state = {**stream.state_dict(), **ShardStream.state_after(consumed[-1])}
    resumed = ShardStream(str(shard_dir), rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(DataLoader(resumed, batch_size=None, num_workers=num_workers)) if num_workers else list(resumed)
    assert ids(consumed + rest) == ids(full) and len(rest) == 3
    with pytest.raises(ValueError, match="same shards, seed and world size"):
        ShardStream(str(shard_dir), rank=0, world_size=3).load_state_dict(state)


def corrupt_copy(shard_dir, tmp_path, how):
    """A copy of the shards whose second shard is damaged; returns (dir, damaged member name)."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(shard_dir, out)
    path = out / "shard-000001.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember("000000004.tokens.npy")
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: member.offset_data + 20]
    else:  # overwrite the .npy header so it is no longer an array
        data[member.offset_data : member.offset_data + 10] = b"garbage!!!"
    path.write_bytes(bytes(data))
    return out, member.name


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_corrupt_shard_names_shard_and_member(shard_dir, tmp_path, how):
    damaged, member = corrupt_copy(shard_dir, tmp_path, how)
    with pytest.raises(CorruptShardError, match=rf"shard-000001\.tar at member '{member}'") as info:
        list(ShardStream(str(damaged), shuffle=False))
    assert isinstance(info.value, ValueError) and "skip_corrupt=True" in str(info.value)
    assert "--skip_corrupt_samples N in launchers/train.py" in str(info.value)


@pytest.mark.parametrize("how,lost", [("truncate", [4, 5]), ("garble", [4])])
def test_skip_corrupt_counts_and_keeps_the_epoch_length(shard_dir, tmp_path, how, lost, caplog):
    damaged, _ = corrupt_copy(shard_dir, tmp_path, how)
    stream = ShardStream(str(damaged), shuffle=False, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        got = list(stream)
    assert stream.corrupt_count == len(lost) and len(got) == NUM_SAMPLES
    assert [s.meta["position"] for s in got] == list(range(NUM_SAMPLES))
    good = [i for i in range(NUM_SAMPLES) if i not in lost]
    assert sorted(set(ids(got))) == good  # lost slots are filled with the previous good sample
    assert ids(got)[lost[0]] == lost[0] - 1
    assert "skipping corrupt sample" in caplog.text


def test_token_ids_outside_the_vocabulary_name_shard_member_and_value(shard_dir, tmp_path, tok):
    """Bytes overwritten inside a token payload leave a valid tar holding a valid array; only the id check
    finds them (the embedding would fail with an anonymous index error, or a device-side assert on GPU)."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(shard_dir, damaged)
    path = damaged / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        info = tar.getmember("000000004.tokens.npy")
        tokens = np.load(io.BytesIO(tar.extractfile(info).read()))
    offset = info.offset_data + info.size - tokens.nbytes + 7 * tokens.itemsize  # the 8th token id
    data[offset : offset + 4] = np.array([70_000], dtype=tokens.dtype).tobytes()
    path.write_bytes(bytes(data))

    with tarfile.open(path) as tar:  # still a valid tar of valid arrays
        assert np.load(io.BytesIO(tar.extractfile(info).read()))[7] == 70_000
    assert len(list(ShardStream(str(damaged), shuffle=False))) == NUM_SAMPLES  # without the vocabulary size
    with pytest.raises(CorruptShardError) as info:
        list(ShardStream(str(damaged), shuffle=False, vocab_size=tok.vocab_size))
    assert str(info.value).startswith(
        f"corrupt shard {damaged}/shard-000001.tar at member '000000004.tokens.npy': token id 70000 at position 7 "
        f"is outside the vocabulary of {tok.vocab_size} ids (0..{tok.vocab_size - 1})"
    )
    stream = ShardStream(str(damaged), shuffle=False, vocab_size=tok.vocab_size, skip_corrupt=True)
    assert len(list(stream)) == NUM_SAMPLES and stream.corrupt_count == 1


def test_never_unpickles(tmp_path):
    import webdataset as wds

    class Bomb:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Bomb()], dtype=object), allow_pickle=True)
    meta = {
        "task": "detect",
        "question": "q",
        "answer_text": "a",
        "facts": [],
        "fact_positions": [],
        "fact_lengths": [],
        "num_tokens": 3,
        "meta": {},
    }
    with wds.TarWriter(str(tmp_path / "evil.tar"), encoder=False) as writer:
        writer.write(
            {
                "__key__": "000",
                "tokens.npy": buf.getvalue(),
                "answer.npy": buf.getvalue(),
                "meta.json": json.dumps(meta).encode(),
                "extra.pickle": pickle.dumps(Bomb()),
            }
        )
    with pytest.raises(CorruptShardError, match="000.answer.npy|000.tokens.npy") as info:
        list(ShardStream(str(tmp_path / "evil.tar"), shuffle=False))
    assert "pickled (object) data, which is never loaded" in str(info.value)
    # a raw pickle instead of a .npy: numpy's own message advises loading it unsafely; ours does not
    with wds.TarWriter(str(tmp_path / "raw.tar"), encoder=False) as writer:
        writer.write(
            {
                "__key__": "000",
                "tokens.npy": pickle.dumps(Bomb()),
                "answer.npy": pickle.dumps(Bomb()),
                "meta.json": json.dumps(meta).encode(),
            }
        )
    with pytest.raises(CorruptShardError, match="pickled \\(object\\) data, which is never loaded") as info:
        list(ShardStream(str(tmp_path / "raw.tar"), shuffle=False))
    assert "unsafely" not in str(info.value) and "allow_pickle" not in str(info.value)
    assert not (tmp_path / "pwned").exists()
    assert isinstance(next(iter_tar_samples(str(tmp_path / "evil.tar")))["extra.pickle"], bytes)


def test_pickle_members_stay_bytes_where_webdatasets_default_decoder_would_run_them(samples, tmp_path):
    import webdataset as wds

    from rmt_scale.data import encode_sample

    class Bomb:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    record = {
        **encode_sample(samples[0], "000"),
        "extra.pyd": pickle.dumps(Bomb()),
        "extra.pickle": pickle.dumps(Bomb()),
    }
    with wds.TarWriter(str(tmp_path / "extra.tar"), encoder=False) as writer:
        writer.write(record)
    [got] = ShardStream(str(tmp_path / "extra.tar"), shuffle=False)
    assert np.array_equal(got.tokens, samples[0].tokens) and not (tmp_path / "pwned").exists()
    [raw] = iter_tar_samples(str(tmp_path / "extra.tar"))
    assert raw["extra.pyd"] == record["extra.pyd"] and raw["extra.pickle"] == record["extra.pickle"]
    wds.autodecode.default_decoder(raw)  # the bomb is live: webdataset's defaults unpickle it
    assert (tmp_path / "pwned").exists()


def test_selection_ends_the_tar_early_and_skips_unselected_data(shard_dir):
    url = str(shard_dir / "shard-000000.tar")
    asked = []

    def second_only(ordinal):
        asked.append(ordinal)
        return None if ordinal > 1 else ordinal == 1

    [record] = iter_tar_samples(url, select=second_only)
    assert record["__key__"] == "000000001" and set(record) == {
        "__key__",
        "__url__",
        "answer.npy",
        "meta.json",
        "tokens.npy",
    }
    assert asked == [0, 1, 2]  # the third sample ended the read; the tar holds three


def test_background_text_shards_read_through_the_same_reader(tok, tmp_path):
    import webdataset as wds

    from rmt_scale.data import Background, filler_sentences

    books = [" ".join(filler_sentences(5, seed=s)) for s in range(3)]
    for shard, part in enumerate((books[:2], books[2:])):
        with wds.TarWriter(str(tmp_path / f"books-{shard}.tar"), encoder=False) as writer:
            for i, text in enumerate(part):
                writer.write({"__key__": f"{shard}{i}", "txt": text.encode(), "cover.pyd": b"not read"})
    background = Background.from_documents(str(tmp_path / "books-{0..1}.tar"), tok)
    assert np.array_equal(background.tokens, Background.from_text("\n".join(books), tok).tokens)
    cut = Background.from_documents(str(tmp_path / "books-{0..1}.tar"), tok, max_chars=len(books[0]))
    assert np.array_equal(cut.tokens, Background.from_text(books[0], tok).tokens)


def test_shards_of_another_tokenizer_are_refused_before_reading(samples, tok, tmp_path):
    """The ids of another tokenizer mean other words, or fall outside the vocabulary and read as corrupt."""
    other = build_word_tokenizer(extra_words=["zebra"])
    out = str(tmp_path / "shards")
    write_shards(samples[:2], out, extra_index=tokenizer_index_fields(tok, "builtin"))
    check_shard_tokenizer(out, build_word_tokenizer(), "builtin")
    with pytest.raises(
        ValueError,
        match=f"--shards {out} were made with tokenizer builtin, this run uses my-tok: pass --tokenizer "
        f"{out}/tokenizer .* or re-create the shards with --tokenizer my-tok",
    ):
        check_shard_tokenizer(out, other, "my-tok")
    # an index written before it recorded the tokenizer: the one saved next to the shards is compared
    old = str(tmp_path / "old")
    write_shards(samples[:2], old, extra_index={"tokenizer": "tokenizer"})
    tok.save(f"{old}/tokenizer")
    check_shard_tokenizer(old, tok, "builtin")
    with pytest.raises(ValueError, match=f"made with tokenizer {old}/tokenizer, this run uses my-tok"):
        check_shard_tokenizer(old, other, "my-tok")
    check_shard_tokenizer(f"{out}/shard-000000.tar", other, "my-tok")  # no index: nothing to compare
