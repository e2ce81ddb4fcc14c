"""Reading tar shards from any fsspec URL: URL and brace expansion, the ``index.json`` of sample counts,
samples through webdataset's tar stages, and errors that name the shard and member. Imports nothing else
from the package, so sample decoding (``shards``) and background text (``background``) both build on it.

``index.json`` lists the shard names in order and their sample counts; the streaming reader needs the
counts to give every rank exactly the same number of samples without reading ahead.
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

INDEX_NAME = "index.json"
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$")
_MISSING = "does not exist"


class CorruptShardError(ValueError):
    """A shard that cannot be read: names the shard URL and the tar member where reading failed."""

    def __init__(self, url: str, member: str, reason: str):
        self.url, self.member, self.reason = url, member, reason
        super().__init__(
            f"corrupt shard {url} at member {member!r}: {reason}. Re-create the shard, or skip "
            "such samples (they are counted and logged): --skip_corrupt_samples N in "
            "launchers/train.py, skip_corrupt=True in ShardStream"
        )


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A URL, a brace pattern (``shard-{000000..000009}.tar``) or a list of them, as a flat list."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    return [u for pattern in urls for u in braceexpand(pattern)]


class _SelectionDone(Exception):
    """Raised by the member filter once ``select`` accepts no more samples: the rest of the tar is not read."""


def _end_when_selection_done(error: Exception) -> bool:
    """webdataset's error handler protocol: False ends the tar quietly; anything else is raised."""
    if isinstance(error, _SelectionDone):
        return False
    raise error


def _own_message(error: Exception, stream) -> str:
    """The message the error was raised with: webdataset's tar stages append the stream and URL to its args,
    and ``" @ <stream>"`` to its message; the shard is named by :class:`CorruptShardError` already."""
    return " ".join(str(arg) for arg in error.args[:-2]).removesuffix(f" @ {stream}")


def iter_tar_samples(url: str, select=None) -> Iterator[dict]:
    """Yields ``{"__key__", "__url__", field: bytes...}`` per sample of a tar, streamed from any fsspec URL.

    The shard is opened with fsspec and read by webdataset's own stages: ``tar_file_expander`` reads the
    members, ``group_by_keys`` groups them into samples. ``select(ordinal)`` (0-based sample number in the
    shard) decides which samples are read: it filters members before their data is read, so the others are
    streamed past. Reading ends early once ``select`` can accept no more (it returns ``None``). Read failures
    raise :class:`CorruptShardError` naming the shard and member. Nothing seeks, so plain HTTP servers work.
    """
    member, key, ordinal, wanted = "<tar header>", None, -1, True

    def select_member(name: str) -> bool:
        nonlocal member, key, ordinal, wanted
        member = name
        prefix, _ = base_plus_ext(name)  # the key group_by_keys will give this member
        if prefix is None:  # no field extension: group_by_keys drops it, so it is no sample
            return False
        if prefix != key:
            key, ordinal = prefix, ordinal + 1
            wanted = True if select is None else select(ordinal)
            if wanted is None:
                raise _SelectionDone
        return wanted

    with fsspec.open(url, "rb") as stream:
        files = tar_file_expander(
            [{"url": url, "stream": stream}], handler=_end_when_selection_done, select_files=select_member
        )
        try:
            yield from group_by_keys(files)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:  # I/O errors pass: not corruption
            raise CorruptShardError(url, member, f"{type(e).__name__}: {_own_message(e, stream)}") from e


def count_tar_samples(url: str) -> int:
    """Number of samples in a tar, streamed through without reading any member's data."""
    seen = 0

    def count(ordinal: int) -> bool:
        nonlocal seen
        seen = ordinal + 1
        return False

    for _ in iter_tar_samples(url, select=count):
        pass
    return seen


def _index_url(source: str | Sequence[str]) -> str | None:
    """The index ``source`` names (an index .json, or a directory holding ``index.json``), or None for shard URLs."""
    if isinstance(source, str) and not _TAR_NAME.search(source) and "{" not in source:
        return source if source.endswith(".json") else f"{source.rstrip('/')}/{INDEX_NAME}"
    return None


def shard_index(source: str | Sequence[str]) -> tuple[str, dict] | None:
    """``(index URL, its JSON)`` when ``source`` names an index (or a directory holding one); None for shard URLs."""
    index_url = _index_url(source)
    if index_url is None:
        return None
    with fsspec.open(index_url, "r") as f:
        return index_url, json.load(f)


def _read_index(index_url: str) -> tuple[list[str], list[int]]:
    _, index = shard_index(index_url)
    base = index_url.rpartition("/")[0]
    return [f"{base}/{s['name']}" for s in index["shards"]], [s["samples"] for s in index["shards"]]


def resolve_shards(source: str | Sequence[str], counts: Sequence[int] | None = None) -> tuple[list[str], list[int]]:
    """Shard URLs and their sample counts from an index, a directory holding ``index.json``, or URLs.

    Without an index and without ``counts``, every shard is read once to count its samples.
    """
    index_url = _index_url(source)
    if index_url is not None:
        return _read_index(index_url)
    urls = expand_urls(source)
    if counts is None:
        counts = [count_tar_samples(u) for u in urls]
    if len(counts) != len(urls):
        raise ValueError(f"got {len(counts)} counts for {len(urls)} shards; give one count per shard")
    return urls, list(counts)


def check_shard_source(source: str, flag: str = "--shards") -> None:
    """Raises ValueError, in one line that names ``flag`` and the fix, when ``source`` cannot be read: a directory
    without an index, a file that is neither a shard nor an index, a bad index, a missing shard or an unreachable
    URL. Reads the index and looks up each shard (one stat or HTTP HEAD each); reads no sample."""
    index_url = _index_url(source)
    if index_url is None:
        urls = expand_urls(source)
    else:
        fs, path = fsspec.core.url_to_fs(source)
        if index_url != source and fs.isfile(path):
            raise ValueError(
                f"{flag} {source} is a file, but neither a .tar/.tar.gz/.tgz shard nor an index .json: "
                f"pass shards, an {INDEX_NAME}, or a directory holding one."
            )
        problem = _unreadable(index_url)
        if problem == _MISSING:
            raise ValueError(
                f"{flag} {source}: {index_url} does not exist. Write shards with tools/make_shards.py "
                "(it writes the index), or name the shards, e.g. "
                f"'{source.rstrip('/')}/shard-{{000000..000009}}.tar'."
            )
        if problem:
            raise ValueError(f"{flag} {source}: {index_url} {problem}.")
        try:
            urls, _ = _read_index(index_url)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{flag} {source}: {index_url} is not a shard index ({type(error).__name__}: {error}); "
                "write it again with tools/make_shards.py."
            ) from None
    for url in urls:
        problem = _unreadable(url)
        if problem:
            raise ValueError(f"{flag}: shard {url} {problem}.")


def _unreadable(url: str) -> str | None:
    """Why ``url`` cannot be opened as a file, or None."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as error:  # fsspec's HTTP filesystem reports an unreachable host as this too
        cause = error.__cause__
        return f"cannot be reached ({type(cause).__name__}: {cause})" if cause else _MISSING
    except Exception as error:  # each filesystem raises its own types
        return f"cannot be reached ({type(error).__name__}: {error})"
    return None if info["type"] == "file" else "is not a file"
