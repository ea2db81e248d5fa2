"""Verifiable tasks: problems with a reference answer and a reward function.

`build_task(cfg)` turns a `TaskConfig` into a task object; `TASKS` maps `task.name` to its class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slipstream.tasks.answers import answers_match, extract_answer
from slipstream.tasks.arithmetic import ArithmeticTask
from slipstream.tasks.base import Problem, Task
from slipstream.tasks.errors import TaskDataError
from slipstream.tasks.gsm8k import Gsm8kTask

if TYPE_CHECKING:
    from slipstream.config import TaskConfig

TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "gsm8k": Gsm8kTask}


def build_task(cfg: TaskConfig) -> Task:
    """The task named by `cfg.name`, configured by `cfg`. Raises ValueError for an unknown name."""
    try:
        cls = TASKS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown task {cfg.name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None
    return cls(cfg)


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "Gsm8kTask",
    "Problem",
    "Task",
    "TaskDataError",
    "answers_match",
    "build_task",
    "extract_answer",
]
