"""The curriculum over the number of segments: draws identical on every rank, resumable, promoted on accuracy
or budget."""

from __future__ import annotations

import pytest

from rmt_scale.training import Curriculum


def test_curriculum_draws_are_rank_identical_and_resumable():
    ranks = [Curriculum([1, 2, 4], 0.9, stage_steps=3, seed=7) for _ in range(2)]
    draws = [[c.draw() for _ in range(20)] for c in ranks]
    assert draws[0] == draws[1]
    fresh = Curriculum([1, 2, 4], 0.9, stage_steps=3, seed=7)
    fresh.stage = 2
    seen = {fresh.draw() for _ in range(200)}
    assert seen == {1, 2, 3, 4}
    state = fresh.state_dict()
    after = [fresh.draw() for _ in range(5)]
    restored = Curriculum([1, 2, 4], 0.9, stage_steps=3, seed=7)
    restored.load_state_dict(state)
    assert [restored.draw() for _ in range(5)] == after
    with pytest.raises(ValueError, match="same --curriculum"):
        Curriculum([1, 2], 0.9, 3, 7).load_state_dict(state)


def test_a_stage_draw_trains_every_step_on_the_stage_length():
    curriculum = Curriculum([1, 4, 10_000], 0.9, stage_steps=2, seed=0, draw="stage")
    lengths = []
    for _ in range(6):
        lengths.append(curriculum.draw())
        curriculum.maybe_promote()
    assert lengths == [1, 1, 4, 4, 10_000, 10_000]
    with pytest.raises(ValueError, match="draw='longest' is unknown: choose one of uniform, stage"):
        Curriculum([1], 0.9, 1, 0, draw="longest")


def test_curriculum_promotes_on_accuracy_or_budget():
    curriculum = Curriculum([1, 2, 4], promote_accuracy=0.9, stage_steps=5, seed=0)
    curriculum.draw()
    assert not curriculum.maybe_promote({1: 0.5})
    assert curriculum.maybe_promote({1: 0.95}) and curriculum.max_segments == 2
    for _ in range(4):
        curriculum.draw()
        assert not curriculum.maybe_promote()
    curriculum.draw()
    assert curriculum.maybe_promote() and curriculum.max_segments == 4
    assert not curriculum.maybe_promote({4: 1.0})  # the last stage stays


def test_a_promotion_says_whether_accuracy_or_budget_made_it():
    """Issue 30, item 10: "accuracy 0.25 at 2 segments -> stage 4" read as a promotion by accuracy when the
    budget made it."""
    curriculum = Curriculum([1, 2, 4], promote_accuracy=0.95, stage_steps=3, seed=0)
    curriculum.draw()
    assert curriculum.maybe_promote({1: 0.5}) is None
    assert curriculum.maybe_promote({1: 0.97}) == "accuracy 0.970 >= 0.95 at 1 segment"
    for _ in range(3):
        curriculum.draw()
    assert curriculum.maybe_promote({2: 0.25}) == "budget: 3 steps at 2 segments, accuracy 0.250 < 0.95"
    assert curriculum.max_segments == 4


def test_a_budget_promotion_without_an_evaluation_at_the_stage_says_so():
    curriculum = Curriculum([1, 2], promote_accuracy=0.9, stage_steps=2, seed=0)
    curriculum.draw()
    curriculum.draw()
    assert curriculum.maybe_promote({4: 1.0}) == "budget: 2 steps at 1 segment"
