"""Long-context task data: bAbI-style facts in background text, documents for language modelling, tokenizers,
streamed tar shards, and the collate that turns samples into model batches."""

from .babi import ACTORS, LOCATIONS, OBJECTS, STORY_KINDS, Story, make_story
from .background import Background, default_background, filler_sentences, split_sentences
from .batching import AnswerClasses, collate, collate_lm, whole_segments
from .documents import Document, DocumentError, iter_documents
from .shards import (
    ShardStream,
    check_shard_task,
    check_shard_tokenizer,
    decode_sample,
    encode_sample,
    tokenizer_index_fields,
    write_shards,
)
from .tars import CorruptShardError, check_shard_source, expand_urls, iter_tar_samples, resolve_shards
from .tasks import TASKS, TaskGenerator, TaskSample, make_sample
from .text import LAYOUTS, LM_TASK, LMCounts, lm_prefix, lm_samples
from .tokenizer import TextTokenizer, build_word_tokenizer, could_be_hub_id, has_tokenizer, load_tokenizer
