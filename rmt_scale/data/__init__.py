"""Long-context task data: bAbI-style facts in background text, tokenizers, and streamed tar shards."""

from .babi import ACTORS, LOCATIONS, OBJECTS, STORY_KINDS, Story, make_story
from .background import Background, default_background, filler_sentences, split_sentences
from .segments import SegmentBatches, collate_segments, iter_segments
from .shards import (CorruptShardError, ShardStream, decode_sample, encode_sample, expand_urls, iter_tar_samples,
                     resolve_shards, write_shards)
from .tasks import IGNORE_INDEX, TASKS, TaskGenerator, TaskSample, build_lm_example, make_sample
from .tokenizer import TextTokenizer, build_word_tokenizer, load_tokenizer

__all__ = [
    "ACTORS", "LOCATIONS", "OBJECTS", "STORY_KINDS", "Story", "make_story",
    "Background", "default_background", "filler_sentences", "split_sentences",
    "SegmentBatches", "collate_segments", "iter_segments",
    "CorruptShardError", "ShardStream", "decode_sample", "encode_sample", "expand_urls", "iter_tar_samples",
    "resolve_shards", "write_shards",
    "IGNORE_INDEX", "TASKS", "TaskGenerator", "TaskSample", "build_lm_example", "make_sample",
    "TextTokenizer", "build_word_tokenizer", "load_tokenizer",
]
