"""Write webdataset tar shards of long-context task samples, or of documents for language modelling (see
docs/data.md).

Examples (or rmt-make-shards ...):
    python tools/make_shards.py --task memorize --tokens 1000000 --samples 8 --out data/memorize-1m
    python tools/make_shards.py --task lm --inputs 'books/*.txt' --tokens 4096 --out data/books-4k
"""

from __future__ import annotations

import argparse
import itertools
import sys

from tqdm import tqdm

from ..data import (
    LAYOUTS,
    LM_TASK,
    STORY_KINDS,
    TASKS,
    Background,
    DocumentError,
    LMCounts,
    TaskGenerator,
    iter_documents,
    lm_samples,
    load_tokenizer,
    tokenizer_index_fields,
    write_shards,
)
from .train import EXIT_CONFIG_ERROR


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--task",
        choices=(*TASKS, LM_TASK),
        required=True,
        help="memorize: fact at the start; detect: fact at a random place; reason: qa2/qa3 story "
        "with each fact at a random place (the question is always at the end); lm: the documents of --inputs, "
        "every token a target",
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        required=True,
        help="length of each sample in tokens of the chosen tokenizer, context plus answer, exactly; "
        "several values are used in turn (sample i gets the (i mod n)-th). lm: one value, the sample length "
        "(--layout whole: at most)",
    )
    p.add_argument(
        "--samples", type=int, help="number of samples to write (required for the tasks; lm: at most, default all)"
    )
    p.add_argument("--out", required=True, help="output directory or fsspec URL (shards + index.json + tokenizer/)")
    p.add_argument(
        "--tokenizer",
        default="builtin",
        help="'builtin' (small word-level tokenizer) or a directory with a Hugging Face tokenizer",
    )
    p.add_argument(
        "--background",
        nargs="+",
        metavar="URL",
        help="documents to use as background instead of the built-in filler (fsspec URLs, globs or brace "
        "patterns, e.g. PG19 books): .txt files, .jsonl (the --text-field of each line), either gzipped, or "
        "webdataset .tar shards whose .txt members are the text",
    )
    p.add_argument(
        "--background-chars",
        type=int,
        default=50_000_000,
        help="read at most this many characters of user background text",
    )
    p.add_argument(
        "--inputs",
        nargs="+",
        metavar="URL",
        help="lm: documents, as fsspec URLs or globs: .txt (one document), .jsonl (one per line), either as .gz, "
        "or webdataset .tar shards (one per .txt member)",
    )
    p.add_argument(
        "--text-field",
        default="text",
        help="the field of each .jsonl line that holds a document's text (--inputs and --background)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="pack",
        help="lm: pack (documents back to back, each ended by the tokenizer's EOS, cut into --tokens samples) or "
        "whole (each document one sample, cut to --tokens; shorter than --min-tokens: dropped and counted)",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        default=32,
        help="lm, --layout whole: drop documents shorter than this, e.g. one segment (the launcher's --segment_size)",
    )
    p.add_argument("--story", choices=STORY_KINDS, help="override the bAbI story kind (reason: qa2 or qa3)")
    p.add_argument(
        "--story-facts",
        type=int,
        help="facts per story, supporting plus distractors (default: only the supporting ones)",
    )
    p.add_argument("--shard-samples", type=int, default=16, help="start a new shard after this many samples")
    p.add_argument("--shard-bytes", type=int, default=1 << 30, help="start a new shard after this many bytes")
    p.add_argument("--seed", type=int, default=0, help="seed; sample i depends only on (seed, i)")
    return p.parse_args(argv)


# a background that the tokenizer turns into more unknown tokens than this is mostly lost: say so
UNKNOWN_SHARE_WARNING = 0.05


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..model import ConfigError

    if args.task == LM_TASK:
        try:
            return write_documents(args)
        except (ConfigError, DocumentError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    try:
        tokenizer, generator = prepare(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    samples = (generator.sample(i, args.tokens[i % len(args.tokens)]) for i in range(args.samples))
    index = write_shards(
        tqdm(samples, total=args.samples, desc=f"{args.task} samples", unit="sample"),
        args.out,
        max_samples=args.shard_samples,
        max_bytes=args.shard_bytes,
        extra_index={
            "task": args.task,
            "tokens": args.tokens,
            "seed": args.seed,
            "story": args.story,
            **tokenizer_index_fields(tokenizer, args.tokenizer),
        },
    )
    tokenizer.save(f"{args.out.rstrip('/')}/tokenizer")  # the exact tokenizer travels with its data
    print(f"wrote {index['total_samples']} samples in {len(index['shards'])} shards to {args.out}")
    return 0


def write_documents(args: argparse.Namespace) -> int:
    """lm shards from the documents of --inputs; raises ConfigError for the flags (before any shard is
    written) and DocumentError for an input without usable text (named with the fix)."""
    check_common(args)
    from ..model import ConfigError
    from ..training.config import as_config_error

    if not args.inputs:
        raise ConfigError("--task lm reads documents: pass --inputs FILES (.txt, .jsonl, .gz of either, or .tar).")
    if len(args.tokens) != 1:
        raise ConfigError(f"--task lm takes one --tokens value, the sample length, not {len(args.tokens)}.")
    if args.min_tokens < 1:
        raise ConfigError(f"--min-tokens {args.min_tokens} must be at least 1.")
    with as_config_error():
        tokenizer = load_tokenizer(args.tokenizer)
    counts = LMCounts()
    documents = tqdm(iter_documents(args.inputs, args.text_field), desc="documents", unit="doc")
    samples = lm_samples(
        documents, tokenizer, args.tokens[0], layout=args.layout, min_tokens=args.min_tokens, counts=counts
    )
    index = write_shards(
        itertools.islice(samples, args.samples),
        args.out,
        max_samples=args.shard_samples,
        max_bytes=args.shard_bytes,
        extra_index=lambda: {
            "task": LM_TASK,
            "tokens": args.tokens,
            "layout": args.layout,
            "min_tokens": args.min_tokens,
            "inputs": args.inputs,
            **counts.as_index(),
            **tokenizer_index_fields(tokenizer, args.tokenizer),
        },
    )
    tokenizer.save(f"{args.out.rstrip('/')}/tokenizer")
    dropped = f", {counts.documents_dropped} dropped (shorter than --min-tokens)" if args.layout == "whole" else ""
    print(
        f"wrote {index['total_samples']} samples of {args.tokens[0]} tokens in {len(index['shards'])} shards to "
        f"{args.out}: {counts.documents} documents{dropped}, {counts.document_tokens} tokens"
    )
    return 0


def check_common(args: argparse.Namespace) -> None:
    """The checks of the flags every task shares (a ConfigError naming the flag and the fix)."""
    import fsspec

    from ..model import ConfigError

    for flag in ("samples", "tokens", "shard_samples", "shard_bytes", "background_chars"):
        values = getattr(args, flag)
        if values is None:
            continue
        values = values if isinstance(values, list) else [values]
        if min(values) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {' '.join(map(str, values))} must be at least 1.")
    fs, root = fsspec.core.url_to_fs(args.out)
    if fs.isfile(root):
        raise ConfigError(f"--out {args.out} is a file: pass a directory (it is created if missing).")


def prepare(args: argparse.Namespace):
    """The tokenizer and the sample generator, after every check that can fail before a shard is written
    (a ConfigError naming the flag and the fix)."""
    import numpy as np

    from ..model import ConfigError
    from ..training.config import as_config_error

    if args.samples is None:
        raise ConfigError(f"--task {args.task} needs --samples: how many samples to write.")
    check_common(args)
    with as_config_error():
        tokenizer = load_tokenizer(args.tokenizer)
        background = None
        if args.background:
            background = Background.from_documents(
                args.background, tokenizer, max_chars=args.background_chars, text_field=args.text_field
            )
        generator = TaskGenerator(
            args.task, tokenizer, background, seed=args.seed, story=args.story, story_facts=args.story_facts
        )
    unknown = tokenizer.hf.unk_token_id
    if background is not None and unknown is not None:
        share = float(np.mean(background.tokens == unknown))
        if share > UNKNOWN_SHARE_WARNING:
            print(
                f"warning: tokenizer {args.tokenizer} reads {share:.0%} of the background's tokens as "
                f"{tokenizer.hf.unk_token}: pass --tokenizer with one that knows the text (e.g. the backbone's).",
                file=sys.stderr,
            )
    # every sample's story, before any is written: sample i's facts, question and answer must fit its length
    needed = max(generator.min_tokens(i) for i in range(args.samples))
    if min(args.tokens) < needed:
        raise ConfigError(
            f"--tokens {min(args.tokens)} is too short: the facts, question and answer of some {args.task} "
            f"samples take {needed} tokens; ask for at least {needed}."
        )
    return tokenizer, generator
