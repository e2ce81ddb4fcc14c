"""Reading text documents from files, for language modelling (:mod:`.text`) and for backgrounds (:mod:`.background`).

Inputs are fsspec URLs, brace patterns or globs of
    ``.txt``         one document per file
    ``.jsonl``       one document per line, its text in one field (``text_field``)
    either ``.gz``   decompressed on the fly (fsspec's ``compression="infer"``)
    ``.tar``         webdataset shards (``.tar.gz``/``.tgz`` too): one document per ``.txt`` member

Bad input raises :class:`DocumentError`, a ValueError whose one-line message names the file and the fix.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec

from .tars import expand_urls, iter_tar_samples

_TAR = re.compile(r"\.(tar|tar\.gz|tgz)$")


class DocumentError(ValueError):
    """An input that holds no usable text: not UTF-8, empty, not JSON, or a JSON line without the text field."""


@dataclass(frozen=True)
class Document:
    source: str  # the file (and line, or tar member) it came from
    text: str


def _decode(data: bytes, source: str, complete: bool = True) -> str:
    """UTF-8 text of ``data``; ``complete=False`` for a file read only in part, whose last character may be cut."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as error:
        raise DocumentError(
            f"{source} is not UTF-8 text (invalid byte at offset {error.start}): convert it to UTF-8 or leave it out."
        ) from None
    if not text.strip():
        raise DocumentError(f"{source} is empty: give files with text, or leave it out.")
    return text


def _jsonl_documents(text: str, source: str, text_field: str) -> Iterator[Document]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DocumentError(f"{where} is not JSON ({error}): give one JSON object per line.") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DocumentError(
                f"{where} has no text field {text_field!r}: pass --text-field with the field that holds the text."
            )
        if value.strip():
            yield Document(where, value)


def _tar_documents(url: str) -> Iterator[Document]:
    if not fsspec.core.url_to_fs(url)[0].exists(url):
        raise DocumentError(f"{url} does not exist: give existing files or globs.")
    found = False
    for record in iter_tar_samples(url):
        if "txt" in record:
            found = True
            source = f"{url} member {record['__key__']}.txt"
            yield Document(source, _decode(record["txt"], source))
    if not found:
        raise DocumentError(f"{url} holds no .txt members: give webdataset shards of text documents.")


def _file_documents(url: str, text_field: str, max_chars: int | None) -> Iterator[Document]:
    if _TAR.search(url):
        yield from _tar_documents(url)
        return
    kind = url.removesuffix(".gz").rpartition(".")[2]
    if kind not in ("txt", "jsonl"):
        raise DocumentError(
            f"{url} is neither .txt, .jsonl (either may end in .gz) nor a .tar shard: give documents in one of those."
        )
    # a .txt file is one document: read no more of it than the characters wanted (UTF-8: at most 4 bytes each)
    limit = 4 * max_chars if kind == "txt" and max_chars is not None else -1
    try:
        with fsspec.open(url, "rb", compression="infer") as f:
            data = f.read(limit)
    except FileNotFoundError:
        raise DocumentError(f"{url} does not exist: give existing files or globs.") from None
    except (OSError, EOFError) as error:  # a damaged .gz
        raise DocumentError(f"{url} cannot be read ({error}): give an intact file.") from None
    text = _decode(data, url, complete=len(data) != limit)
    if kind == "txt":
        yield Document(url, text[:max_chars])
    else:
        yield from _jsonl_documents(text, url, text_field)


def input_urls(urls: str | Sequence[str]) -> list[str]:
    """Every file ``urls`` names (brace patterns and globs expanded, in order), or DocumentError if none."""
    files = fsspec.open_files(expand_urls(urls))
    if not files:
        raise DocumentError(f"no files match {' '.join(expand_urls(urls))}: give existing files or globs.")
    # local files by their path, as the user named them; others by their URL
    return [f.path if "file" in f.fs.protocol else f.full_name for f in files]


def iter_documents(
    urls: str | Sequence[str], text_field: str = "text", max_chars: int | None = None
) -> Iterator[Document]:
    """The documents of ``urls`` in order (see the module's docstring for the formats); with ``max_chars``, they end
    once that many characters have been read, and a .txt file is read only as far as they reach."""
    left = max_chars
    for url in input_urls(urls):
        for document in _file_documents(url, text_field, left):
            yield document
            if left is not None:
                left -= len(document.text)
                if left <= 0:
                    return
