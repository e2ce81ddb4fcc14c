"""ARMT's memory works: trained from scratch on associative recall, it answers at 4x the training length,
while the same backbone without memory stays at chance."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from rmt_scale import ARMTConfig, RecurrentMemoryModel, RMTConfig

NUM_KEYS = 16  # and as many values: chance is 1/16
QUERY = 1
FIRST_KEY = 2
FIRST_VALUE = FIRST_KEY + NUM_KEYS
VOCAB = FIRST_VALUE + NUM_KEYS
TRAIN_PAIRS = (2, 3)  # at most 3 pair segments + 1 query segment = 4 segments, 8 tokens
TEST_PAIRS = 15  # 16 segments, 32 tokens: 4x the longest training input
# Training converges abruptly, after 500 to 1000 steps depending on the seed: a fixed step budget lands some
# seeds just past that point, with a memory that does not yet hold at 4x the length. So training runs until
# it answers at the training length, then for a fixed tail with a decaying learning rate.
CONVERGED = 0.98  # accuracy at the longest training input that ends the first phase
CHECK_EVERY = 100
MAX_STEPS = 3000  # the first phase's cap
TAIL_STEPS = 800
LR = 2e-3  # 3e-3 left one seed in 10 unconverged after 3000 steps; 5e-3 left 2 of 2 tried unconverged


def recall_batch(num_pairs: int, size: int, generator: torch.Generator):
    """``k1 v1 k2 v2 ... QUERY k`` followed by the value stored with ``k``; distinct keys, random values.
    With segments of 2 tokens every pair has its own segment and the query comes last."""
    keys = torch.rand(size, NUM_KEYS, generator=generator).argsort(dim=1)[:, :num_pairs]
    values = torch.randint(NUM_KEYS, (size, num_pairs), generator=generator)
    asked = torch.randint(num_pairs, (size, 1), generator=generator)
    pairs = torch.stack([keys + FIRST_KEY, values + FIRST_VALUE], dim=2).flatten(1)
    query = torch.cat([torch.full((size, 1), QUERY), keys.gather(1, asked) + FIRST_KEY], dim=1)
    answer = values.gather(1, asked) + FIRST_VALUE
    input_ids = torch.cat([pairs, query, answer], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = answer[:, 0]
    return input_ids, labels


def tiny_model(config, seed: int) -> RecurrentMemoryModel:
    """A one-layer Llama-style decoder, d=64, from scratch."""
    torch.manual_seed(seed)
    backbone = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=8,
            initializer_range=0.1,
        )
    )
    return RecurrentMemoryModel(backbone, config)


def train_step(model: RecurrentMemoryModel, optimizer, generator: torch.Generator) -> None:
    # never a single pair: with one pair, reading anything returns its value, and the model learns to
    # ignore the query (measured: 94% on 1 pair, 11% on 16 after 2400 such steps)
    num_pairs = int(torch.randint(TRAIN_PAIRS[0], TRAIN_PAIRS[1] + 1, (1,), generator=generator))
    input_ids, labels = recall_batch(num_pairs, 32, generator)
    loss = model(input_ids, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def train_until_converged(model: RecurrentMemoryModel, seed: int) -> int:
    """Constant learning rate until ``CONVERGED`` at the longest training input (checked on held-out samples),
    then ``TAIL_STEPS`` with the rate decaying to 0. Returns the number of steps taken."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    steps = 0
    while steps < MAX_STEPS:
        train_step(model, optimizer, generator)
        steps += 1
        if steps % CHECK_EVERY == 0 and accuracy(model.eval(), TRAIN_PAIRS[1], samples=256, seed=999) >= CONVERGED:
            break
        model.train()
    return steps + train_fixed(model, generator, optimizer, TAIL_STEPS)


def train_fixed(model: RecurrentMemoryModel, generator: torch.Generator, optimizer, steps: int) -> int:
    """``steps`` steps with the learning rate decaying linearly from ``LR`` to 0."""
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * (1 - step / steps)
        train_step(model, optimizer, generator)
    return steps


@torch.no_grad()
def accuracy(model: RecurrentMemoryModel, num_pairs: int, samples: int = 512, seed: int = 12345) -> float:
    input_ids, _ = recall_batch(num_pairs, samples, torch.Generator().manual_seed(seed))
    logits = model(input_ids[:, :-1], return_logits=True).logits[:, -1, FIRST_VALUE:]
    return (logits.argmax(-1) + FIRST_VALUE == input_ids[:, -1]).float().mean().item()


def armt_config() -> ARMTConfig:
    return ARMTConfig(num_mem_tokens=1, segment_size=2, d_mem=32, num_heads=2)


def no_memory_config() -> RMTConfig:
    return RMTConfig(num_mem_tokens=0, segment_size=2)


@pytest.mark.slow
# RMT_RECALL_SEEDS=0,1,2,3,4,5,6,7,8,9 reruns the sweep docs/armt.md reports
@pytest.mark.parametrize("seed", [int(seed) for seed in os.environ.get("RMT_RECALL_SEEDS", "0,1").split(",")])
def test_armt_learns_associative_recall_and_answers_at_4x_the_training_length(seed):
    torch.set_num_threads(1)
    armt = tiny_model(armt_config(), seed)
    steps = train_until_converged(armt, seed)
    # the no-memory twin gets the same number of steps, in the same two phases
    no_memory = tiny_model(no_memory_config(), seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(no_memory.parameters(), lr=LR, weight_decay=0.0)
    train_fixed(no_memory, generator, optimizer, steps)
    armt_accuracy, baseline_accuracy = accuracy(armt.eval(), TEST_PAIRS), accuracy(no_memory.eval(), TEST_PAIRS)
    print(
        f"seed {seed}, {steps} steps; accuracy at {TEST_PAIRS} pairs: ARMT {armt_accuracy:.3f}, "
        f"no memory {baseline_accuracy:.3f}"
    )
    # measured 0.980-1.000 over seeds 0-9 (1 thread); the margin absorbs other CPUs' round-off
    assert armt_accuracy >= 0.85
    assert baseline_accuracy <= 1 / NUM_KEYS + 0.05
