"""Procedural multi-step arithmetic: a start number followed by a chain of operations in words.

"Start with 7. Add 5, then multiply the result by 3, then subtract 4. What is the final result?"

The number of steps k follows a geometric law with parameter ``step_p`` on {1, 2, ...}; values
below ``min_steps`` are raised to it and the law is truncated (renormalised) above ``max_steps``
so the tail thins out instead of piling up at the cap. Most problems are therefore short and a
few are long, which makes chain-of-thought lengths long-tailed.

Train and eval come from two seeded random streams. On top of that, every question text is
assigned to one side by a stable hash (``EVAL_SHARE`` of the question space belongs to eval), so
the splits are disjoint by construction, and the eval set does not change with ``num_train``.
Eval questions are also distinct from each other; train questions may repeat (each repeat has
its own uid), which keeps the train step distribution exactly the geometric one.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

from slipstream.tasks.errors import TaskDataError
from slipstream.tasks.answers import answers_match, extract_answer
from slipstream.tasks.base import Problem

if TYPE_CHECKING:
    from slipstream.config import TaskConfig

VALUE_LIMIT = 1000  # |intermediate value| stays at or below this
MAX_MULTIPLIER = 12  # multiplications use small factors so values do not explode
EVAL_SHARE = 0.2  # fraction of the question space reserved for the eval split
_OP_ORDER = "+-*"
_SYMBOL_TEXT = {"+": "add {a}", "-": "subtract {a}", "*": "multiply the result by {a}"}
_FIRST_TEXT = {"+": "Add {a}", "-": "Subtract {a}", "*": "Multiply it by {a}"}


def apply_op(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"unknown operation {op!r}")


def step_weights(min_steps: int, max_steps: int, step_p: float) -> list[float]:
    """Probabilities of k = min_steps..max_steps (geometric, raised below, truncated above)."""
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}..{max_steps}")
    if not 0.0 < step_p <= 1.0:
        raise ValueError(f"step_p={step_p} must be in (0, 1]")
    q = 1.0 - step_p
    below = 1.0 - q ** (min_steps - 1)  # P(k < min_steps), moved onto min_steps
    weights = [step_p * q ** (k - 1) for k in range(min_steps, max_steps + 1)]
    weights[0] += below
    total = sum(weights)
    return [w / total for w in weights]


def in_eval_space(question: str) -> bool:
    """Stable split of the question space (sha1, not Python's salted hash())."""
    digest = hashlib.sha1(b"slipstream-arith-split:" + question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < EVAL_SHARE


def render_expression(start: int, ops: list[list]) -> str:
    """The chain as one expression, evaluated left to right: parentheses where '*' follows '+'/'-'."""
    expr, additive = str(start), False
    for op, a in ops:
        if op == "*" and additive:
            expr = f"({expr})"
        expr = f"{expr} {op} {a}"
        additive = op in "+-"
    return f"What is {expr}?"


def render_question(start: int, ops: list[list], style: str = "words") -> str:
    if style == "expression":
        return render_expression(start, ops)
    parts = []
    for i, (op, a) in enumerate(ops):
        if i == 0:
            parts.append(_FIRST_TEXT[op].format(a=a))
        else:
            parts.append("then " + _SYMBOL_TEXT[op].format(a=a))
    return f"Start with {start}. " + ", ".join(parts) + ". What is the final result?"


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.operations = [op for op in _OP_ORDER if op in set(cfg.operations)]
        unknown = set(cfg.operations) - set(_OP_ORDER)
        if not self.operations or unknown:
            raise ValueError(f"task.operations={cfg.operations!r} must be a non-empty subset of '+-*'")
        if cfg.style not in ("words", "expression"):
            raise ValueError(f"task.style={cfg.style!r} must be one of: words, expression")
        if cfg.max_operand < 1:
            raise ValueError(f"task.max_operand={cfg.max_operand} must be >= 1")
        self._steps = list(range(cfg.min_steps, cfg.max_steps + 1))
        self._weights = step_weights(cfg.min_steps, cfg.max_steps, cfg.step_p)
        self._train: list[Problem] | None = None
        self._eval: list[Problem] | None = None

    # -- generation -------------------------------------------------------------------------

    def _operand_choices(self, value: int) -> dict[str, tuple[int, int]]:
        """For each allowed operation, the inclusive operand range that keeps |value| bounded."""
        top = min(self.cfg.max_operand, VALUE_LIMIT)
        ranges = {}
        for op in self.operations:
            if op == "+":
                lo, hi = 1, min(top, VALUE_LIMIT - value)
            elif op == "-":
                lo, hi = 1, min(top, VALUE_LIMIT + value)
            else:
                if value == 0:
                    continue  # 0 * a is a degenerate step
                lo, hi = 2, min(top, MAX_MULTIPLIER, VALUE_LIMIT // abs(value))
            if hi >= lo:
                ranges[op] = (lo, hi)
        return ranges

    def _sample_chain(self, rng: random.Random) -> tuple[int, list[list]]:
        k = rng.choices(self._steps, weights=self._weights)[0]
        start = rng.randint(1, min(self.cfg.max_operand, VALUE_LIMIT))
        value, ops = start, []
        for _ in range(k):
            ranges = self._operand_choices(value)
            if ranges:
                op = rng.choice(sorted(ranges, key=_OP_ORDER.index))
                operand = rng.randint(*ranges[op])
            else:  # nothing keeps the bound (e.g. only '*' allowed and |value| > 500)
                op, operand = self.operations[0], 1
            value = apply_op(value, op, operand)
            ops.append([op, operand])
        return start, ops

    def _make_problem(self, uid: str, start: int, ops: list[list]) -> Problem:
        values = [start]
        for op, a in ops:
            values.append(apply_op(values[-1], op, a))
        question = render_question(start, ops, self.cfg.style)
        meta = {"steps": len(ops), "start": start, "ops": ops, "values": values}
        problem = Problem(uid=uid, question=self._with_instruction(question), answer=str(values[-1]),
                          meta=meta)
        meta["raw_question"] = question
        meta["solution"] = self.reference_solution(problem)
        return problem

    def _with_instruction(self, question: str) -> str:
        return question + "\n" + self.cfg.instruction if self.cfg.instruction else question

    def _generate(self, split: str) -> list[Problem]:
        want = self.cfg.num_train if split == "train" else self.cfg.num_eval
        rng = random.Random(f"slipstream-arith-{split}-{self.cfg.seed}")
        problems: list[Problem] = []
        seen: set[str] = set()
        attempts, max_attempts = 0, 1000 + 200 * want
        while len(problems) < want:
            attempts += 1
            if attempts > max_attempts:
                raise TaskDataError(
                    f"arithmetic: could only generate {len(problems)} of {want} distinct {split} "
                    f"problems; raise task.max_operand or task.max_steps, or lower task.num_{split}")
            start, ops = self._sample_chain(rng)
            question = render_question(start, ops, self.cfg.style)
            if in_eval_space(question) != (split == "eval"):
                continue
            if split == "eval":
                if question in seen:
                    continue
                seen.add(question)
            problems.append(self._make_problem(f"arith-{split}-{len(problems):06d}", start, ops))
        return problems

    # -- Task protocol ----------------------------------------------------------------------

    def train_problems(self) -> list[Problem]:
        if self._train is None:
            self._train = self._generate("train")
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        if self._eval is None:
            self._eval = self._generate("eval")
        return list(self._eval)

    def reward(self, problem: Problem, completion: str) -> float:
        pred = extract_answer(completion, self.cfg.answer_format)
        return 1.0 if answers_match(pred, problem.answer) else 0.0

    @staticmethod
    def reference_solution(problem: Problem) -> str:
        """One line per step ("7 + 5 = 12"), then "#### <answer>"."""
        value = problem.meta["start"]
        lines = []
        for op, a in problem.meta["ops"]:
            new = apply_op(value, op, a)
            lines.append(f"{value} {op} {a} = {new}")
            value = new
        lines.append(f"#### {value}")
        return "\n".join(lines)
