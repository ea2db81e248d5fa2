"""What every task hands the trainer: problems with a prompt, a reference answer and a verifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    """One prompt of a task. `uid` is stable across runs (it keys GRPO groups and drafter history)."""

    uid: str
    question: str  # the user message, without chat formatting
    answer: str  # canonical final answer, compared by the task's verifier
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    name: str

    def train_problems(self) -> list[Problem]:
        """The training split, in a fixed order (the trainer shuffles with its own seeded RNG)."""

    def eval_problems(self) -> list[Problem]:
        """The held-out split; disjoint from the training split."""

    def reward(self, problem: Problem, completion: str) -> float:
        """Verifiable reward of one completion (1.0 correct, 0.0 otherwise)."""
