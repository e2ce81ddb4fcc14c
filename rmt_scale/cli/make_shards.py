"""Write webdataset tar shards of long-context task samples (see docs/data.md).

Example: python tools/make_shards.py --task memorize --tokens 1000000 --samples 8 --out data/memorize-1m
(or rmt-make-shards ...)
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..data import STORY_KINDS, TASKS, Background, TaskGenerator, load_tokenizer, tokenizer_index_fields, write_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--task",
        choices=TASKS,
        required=True,
        help="memorize: fact at the start; detect: fact at a random place; reason: qa2/qa3 story "
        "with each fact at a random place. The question is always at the end",
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        required=True,
        help="length of each sample in tokens of the chosen tokenizer, context plus answer, exactly; "
        "several values are used in turn (sample i gets the (i mod n)-th)",
    )
    p.add_argument("--samples", type=int, required=True, help="number of samples to write")
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
        help="plain-text files (fsspec URLs or globs, e.g. PG19 books) to use as background "
        "instead of the built-in filler",
    )
    p.add_argument(
        "--background-shards",
        nargs="+",
        metavar="URL",
        help="webdataset shards whose .txt members are the background text",
    )
    p.add_argument(
        "--background-chars",
        type=int,
        default=50_000_000,
        help="read at most this many characters of user background text",
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


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    background = None
    if args.background:
        background = Background.from_files(args.background, tokenizer, max_chars=args.background_chars)
    elif args.background_shards:
        background = Background.from_text_shards(args.background_shards, tokenizer, max_chars=args.background_chars)
    generator = TaskGenerator(
        args.task, tokenizer, background, seed=args.seed, story=args.story, story_facts=args.story_facts
    )
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
