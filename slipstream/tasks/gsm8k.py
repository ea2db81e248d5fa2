"""GSM8K-format word problems from local files.

Accepted files: jsonl (one JSON object per line, blank lines allowed) or parquet (by the
``.parquet`` extension; needs pyarrow). Every record has string fields ``question`` and
``answer``, the answer being a worked solution that ends in "#### N".

Splits: ``eval_path`` when given (questions that also appear in it are dropped from the training
file), else a held-out ``eval_fraction`` of ``path`` chosen by a stable sha1 of the question
text, so train and eval are disjoint and identical across runs and seeds. ``num_train`` and
``num_eval`` keep the first N of each split in file order. A question that repeats within a split
is kept once (uids derive from the question text and must be unique).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Iterator

from slipstream.tasks.answers import answers_match, extract_answer, extract_strict
from slipstream.tasks.base import Problem
from slipstream.tasks.errors import TaskDataError

if TYPE_CHECKING:
    from slipstream.config import TaskConfig

FIELDS = ("question", "answer")


def question_key(question: str) -> str:
    return question.strip()


def question_uid(question: str) -> str:
    return "gsm8k-" + hashlib.sha1(question_key(question).encode("utf-8")).hexdigest()[:12]


def in_eval_split(question: str, eval_fraction: float) -> bool:
    """Stable held-out choice by sha1 of the question (independent of Python's salted hash())."""
    digest = hashlib.sha1(b"slipstream-gsm8k-split:" + question_key(question).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def _check_record(record, where: str) -> tuple[str, str, str]:
    """(question, full answer text, gold number) of one record, or TaskDataError naming `where`."""
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object with 'question' and 'answer', "
                            f"got {type(record).__name__}")
    values = []
    for name in FIELDS:
        if name not in record or record[name] is None:
            raise TaskDataError(f"{where}: missing field '{name}'")
        if not isinstance(record[name], str):
            raise TaskDataError(f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}")
        values.append(record[name])
    question, answer = values
    if not question.strip():
        raise TaskDataError(f"{where}: field 'question' is empty")
    gold = extract_strict(answer)
    if gold is None:
        raise TaskDataError(f"{where}: field 'answer' has no final '#### N' (a number right after the last '####')")
    return question, answer, gold


def _iter_jsonl(path: str) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_parquet(path: str) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskDataError(f"{path}: reading parquet needs pyarrow; install it with "
                            "`pip install pyarrow` (or the `parquet` extra), or convert the file to jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise TaskDataError(f"{path}: cannot read parquet file ({e})") from None
    missing = [name for name in FIELDS if name not in table.column_names]
    if missing:
        raise TaskDataError(f"{path}: missing column(s) {', '.join(map(repr, missing))} "
                            f"(columns: {', '.join(table.column_names) or 'none'})")
    columns = {name: table.column(name).to_pylist() for name in FIELDS}
    for i in range(table.num_rows):
        yield f"{path}:row {i + 1}", {name: columns[name][i] for name in FIELDS}


def load_records(path: str) -> list[tuple[str, str, str, str]]:
    """All records of a GSM8K-format file as (question, answer text, gold, location) tuples."""
    if not path:
        raise TaskDataError("task.path must name a GSM8K-format file (jsonl or parquet)")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TaskDataError(f"{path}: file not found" if not os.path.exists(path) else f"{path}: not a file")
    rows = _iter_parquet(path) if path.lower().endswith(".parquet") else _iter_jsonl(path)
    records = []
    try:
        for where, record in rows:
            records.append((*_check_record(record, where), where))
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return records


class Gsm8kTask:
    name = "gsm8k"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        if not cfg.eval_path and not 0.0 <= cfg.eval_fraction <= 1.0:
            raise ValueError(f"task.eval_fraction={cfg.eval_fraction} must be in [0, 1]")
        self._splits: tuple[list[Problem], list[Problem]] | None = None

    def _problem(self, question: str, answer: str, gold: str, where: str) -> Problem:
        text = question.rstrip()
        if self.cfg.instruction:
            text = text + "\n" + self.cfg.instruction
        return Problem(uid=question_uid(question), question=text, answer=gold,
                       meta={"solution": answer, "source": where})

    def _build(self, records, limit: int, exclude: set[str] = frozenset()) -> list[Problem]:
        problems, seen = [], set()
        for question, answer, gold, where in records:
            if len(problems) >= limit:
                break
            key = question_key(question)
            if key in seen or key in exclude:
                continue
            seen.add(key)
            problems.append(self._problem(question, answer, gold, where))
        return problems

    def _load(self) -> tuple[list[Problem], list[Problem]]:
        if self._splits is None:
            records = load_records(self.cfg.path)
            if self.cfg.eval_path:
                eval_records = load_records(self.cfg.eval_path)
                train_records = records
                exclude = {question_key(r[0]) for r in eval_records}
            else:
                frac = self.cfg.eval_fraction
                eval_records = [r for r in records if in_eval_split(r[0], frac)]
                train_records = [r for r in records if not in_eval_split(r[0], frac)]
                exclude = set()
            self._splits = (self._build(train_records, self.cfg.num_train, exclude),
                            self._build(eval_records, self.cfg.num_eval))
        return self._splits

    def train_problems(self) -> list[Problem]:
        return list(self._load()[0])

    def eval_problems(self) -> list[Problem]:
        return list(self._load()[1])

    def reward(self, problem: Problem, completion: str) -> float:
        pred = extract_answer(completion, self.cfg.answer_format)
        return 1.0 if answers_match(pred, problem.answer) else 0.0

    @staticmethod
    def reference_solution(problem: Problem) -> str:
        """The dataset's worked solution, ending in "#### N"."""
        return problem.meta["solution"]
