"""Tokenizers for the data pipeline: a small built-in word-level one, or any Hugging Face tokenizer.

Both are used through :class:`TextTokenizer`, which turns text into int32 arrays. Every piece of text
(a background sentence, a fact, the question, the answer) is encoded on its own with a leading space, so
pieces concatenate to the same ids a BPE tokenizer would give for the running text.

The built-in tokenizer knows exactly the words of the built-in background and of bAbI (lower-cased) plus
punctuation, so its vocabulary is a few hundred entries and every answer (a location) is one token. It is
saved next to every run as a standard ``tokenizer.json`` + ``tokenizer_config.json`` directory, which
``transformers.AutoTokenizer.from_pretrained(dir)`` loads like any other tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence

import fsspec
import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from ..model.gguf import is_gguf, load_gguf_tokenizer
from .babi import VOCABULARY as BABI_VOCABULARY
from .background import FILLER_VOCABULARY

PAD, UNK, EOS, SEP, CLS = "[PAD]", "[UNK]", "[EOS]", "[SEP]", "[CLS]"
# Files AutoTokenizer builds a tokenizer from. A directory with none of them, such as a backbone saved alone, gets
# an empty tokenizer of its family or a request to install sentencepiece: neither says the tokenizer is missing.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)
SPECIAL_TOKENS = (PAD, UNK, EOS, SEP)
PUNCTUATION = tuple(".,;:!?'\"-()")


class TextTokenizer:
    """A Hugging Face tokenizer seen as text -> int32 ids, with the ids the data pipeline needs."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = hf_tokenizer.eos_token_id
        # encoders frame every segment as [CLS] memory [SEP] segment [SEP]
        self.cls_id, self.sep_id = hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id
        # Padding never reaches the loss (labels are -100 there), so any id works if none is defined.
        pad = hf_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        ids = self.hf([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids]

    @property
    def fingerprint(self) -> str:
        """A hash of the vocabulary and the special ids: tokenizers with different fingerprints give different
        ids (shards record it, so a run with another tokenizer is refused before it reads them)."""
        parts = [sorted(self.hf.get_vocab().items()), self.eos_id, self.pad_id, self.cls_id, self.sep_id]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def decode(self, ids) -> str:
        return self.hf.decode(np.asarray(ids).tolist())

    def save(self, directory: str) -> None:
        """Writes a directory that :func:`load_tokenizer` and ``AutoTokenizer.from_pretrained`` read.

        ``directory`` may be any fsspec URL; remote ones are written locally first, then uploaded.
        """
        fs, path = fsspec.core.url_to_fs(directory)
        if "file" in fs.protocol:  # protocol is a tuple of names
            self.hf.save_pretrained(path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.hf.save_pretrained(tmp)
            fs.put(f"{tmp}/", path, recursive=True)


def build_word_tokenizer(extra_words: Sequence[str] = ()) -> TextTokenizer:
    """The built-in word-level tokenizer: specials, punctuation, bAbI words, background words, extras, [CLS]."""
    from transformers import PreTrainedTokenizerFast

    words = [w.lower() for w in (*BABI_VOCABULARY, *FILLER_VOCABULARY, *extra_words)]
    # [CLS] (for encoders) came later than the rest: last, so every other token keeps the id it had
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys((*SPECIAL_TOKENS, *PUNCTUATION, *words, CLS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces, tidies punctuation
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=EOS, sep_token=SEP, cls_token=CLS
    )
    return TextTokenizer(hf)


def could_be_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face id ("name" or "owner/name") rather than a path."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1


def has_tokenizer(directory: str) -> bool:
    """Whether a local directory holds a tokenizer (one of ``TOKENIZER_FILES``)."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def load_tokenizer(name: str | None = None) -> TextTokenizer:
    """The built-in tokenizer (``None`` or ``"builtin"``), the tokenizer of a GGUF file (a ``.gguf`` path or a
    registry name such as ``"smollm2-135m"``), or ``AutoTokenizer.from_pretrained(name)``: a directory saved by
    ``save_pretrained`` / :meth:`TextTokenizer.save`, or a Hugging Face id."""
    if name in (None, "builtin"):
        return build_word_tokenizer()
    if is_gguf(name):
        return TextTokenizer(load_gguf_tokenizer(name))
    from transformers import AutoTokenizer

    if os.path.isdir(os.path.expanduser(name)):
        name = os.path.expanduser(name)
        if not has_tokenizer(name):
            raise ValueError(
                f"{name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): pass a tokenizer "
                "directory, or 'builtin'."
            )
    elif not could_be_hub_id(name):
        raise ValueError(
            f"tokenizer directory {name!r} does not exist; give a directory saved by "
            "save_pretrained / TextTokenizer.save, a Hugging Face id, or 'builtin'"
        )
    return TextTokenizer(AutoTokenizer.from_pretrained(name))
