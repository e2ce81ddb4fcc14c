"""Curriculum over the number of segments.

Stages are segment counts (e.g. 1, 2, 4, 8). In stage n every step's length is drawn uniformly from 1..n
segments (``draw="uniform"``, the ARMT papers' recipe), or is n (``"stage"``, the first RMT paper's; what a
long last stage needs for every step to train on its full length). Every rank holds the same seeded
generator and draws once per step, so all ranks run the same number of segments (unequal counts abort or
hang the collectives). A stage ends when the evaluation accuracy at its length reaches a threshold, or when
its step budget is spent.
"""

from __future__ import annotations

import numpy as np

CURRICULUM_DRAWS = ("uniform", "stage")


class Curriculum:
    def __init__(self, stages: list[int], promote_accuracy: float, stage_steps: int, seed: int, draw: str = "uniform"):
        if draw not in CURRICULUM_DRAWS:
            raise ValueError(f"draw={draw!r} is unknown: choose one of {', '.join(CURRICULUM_DRAWS)}.")
        self.stages, self.promote_accuracy, self.stage_steps = list(stages), promote_accuracy, stage_steps
        self.draw_kind = draw
        self.stage = 0
        self.steps_in_stage = 0
        self.rng = np.random.default_rng([seed, 0xC0])

    @property
    def max_segments(self) -> int:
        return self.stages[self.stage]

    @property
    def is_last_stage(self) -> bool:
        return self.stage == len(self.stages) - 1

    def draw(self) -> int:
        """This step's number of segments; the same on every rank."""
        self.steps_in_stage += 1
        if self.draw_kind == "stage":
            return self.max_segments
        return int(self.rng.integers(1, self.max_segments + 1))

    def maybe_promote(self, accuracy_by_segments: dict[int, float] | None = None) -> str | None:
        """Moves to the next stage when the stage's accuracy or step budget says so; returns why, as a log line's
        words ("accuracy 0.970 >= 0.95 at 2 segments", "budget: 50 steps at 2 segments, accuracy 0.250 < 0.95"), or
        None if it did not."""
        if self.is_last_stage:
            return None
        segments = f"{self.max_segments} segment{'s' if self.max_segments > 1 else ''}"
        accuracy = (accuracy_by_segments or {}).get(self.max_segments)
        if accuracy is not None and accuracy >= self.promote_accuracy:
            reason = f"accuracy {accuracy:.3f} >= {self.promote_accuracy:g} at {segments}"
        elif self.stage_steps > 0 and self.steps_in_stage >= self.stage_steps:
            measured = "" if accuracy is None else f", accuracy {accuracy:.3f} < {self.promote_accuracy:g}"
            reason = f"budget: {self.steps_in_stage} steps at {segments}{measured}"
        else:
            return None
        self.stage += 1
        self.steps_in_stage = 0
        return reason

    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "steps_in_stage": self.steps_in_stage,
            "rng": self.rng.bit_generator.state,
            "stages": self.stages,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["stages"] != self.stages:
            raise ValueError(
                f"cannot resume: the checkpoint's curriculum is {state['stages']}, this run's is "
                f"{self.stages}; resume with the same --curriculum."
            )
        self.stage, self.steps_in_stage = state["stage"], state["steps_in_stage"]
        self.rng.bit_generator.state = state["rng"]
