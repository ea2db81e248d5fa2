import re
import statistics
from collections import Counter

import pytest

from slipstream.config import TaskConfig
from slipstream.tasks import TASKS, build_task
from slipstream.tasks.arithmetic import ArithmeticTask, VALUE_LIMIT


def _cfg(**kw):
    base = dict(num_train=600, num_eval=64, seed=3)
    base.update(kw)
    return TaskConfig(name="arithmetic", **base)


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(_cfg())


@pytest.fixture(scope="module")
def train(task):
    return task.train_problems()


@pytest.fixture(scope="module")
def evals(task):
    return task.eval_problems()


def _evaluate(start, ops):
    value = start
    for op, a in ops:
        value = {"+": value + a, "-": value - a, "*": value * a}[op]
    return value


_WORDS = {"add": "+", "subtract": "-", "multiply the result by": "*", "multiply it by": "*"}


def _parse_question(question):
    """Recover (start, ops) from the question text alone."""
    first_line = question.split("\n")[0]
    m = re.fullmatch(r"Start with (\d+)\. (.*)\. What is the final result\?", first_line)
    assert m, first_line
    ops = []
    for i, part in enumerate(m.group(2).split(", ")):
        if i > 0:
            assert part.startswith("then ")
            part = part[len("then "):]
        words, number = part.rsplit(" ", 1)
        ops.append([_WORDS[words.lower()], int(number)])
    return int(m.group(1)), ops


def test_sizes_and_uids(train, evals):
    assert len(train) == 600 and len(evals) == 64
    assert train[123].uid == "arith-train-000123"
    assert evals[7].uid == "arith-eval-000007"
    assert len({p.uid for p in train + evals}) == 664


def test_answer_matches_independent_evaluation(train, evals):
    cfg = _cfg()
    for p in train + evals:
        start, ops = _parse_question(p.question)
        assert start == p.meta["start"] and ops == p.meta["ops"]
        assert len(ops) == p.meta["steps"]
        assert cfg.min_steps <= len(ops) <= cfg.max_steps
        assert int(p.answer) == _evaluate(start, ops)
        assert 1 <= start <= cfg.max_operand
        assert all(op in cfg.operations and 1 <= a <= cfg.max_operand for op, a in ops)
        assert all(abs(v) <= VALUE_LIMIT for v in p.meta["values"])


def test_question_format_and_instruction(train):
    cfg = _cfg()
    p = train[0]
    assert p.question.endswith("What is the final result?\n" + cfg.instruction)
    bare = ArithmeticTask(_cfg(instruction="")).train_problems()[0]
    assert bare.question.endswith("What is the final result?")
    assert bare.answer == p.answer


def test_reference_solution_scores_and_perturbation_fails(task, train, evals):
    for p in train + evals:
        sol = task.reference_solution(p)
        lines = sol.split("\n")
        assert len(lines) == p.meta["steps"] + 1
        assert lines[-1] == f"#### {p.answer}"
        assert task.reward(p, sol) == 1.0
        wrong = sol.rsplit("#### ", 1)[0] + f"#### {int(p.answer) + 1}"
        assert task.reward(p, wrong) == 0.0
    p = train[0]
    assert task.reward(p, "") == 0.0
    assert task.reward(p, f"the result is {p.answer}.") == 1.0  # flexible by default


def test_reference_solution_lines_are_correct(task, train):
    for p in train[:200]:
        lines = task.reference_solution(p).split("\n")[:-1]
        prev = p.meta["start"]
        for line, (op, a) in zip(lines, p.meta["ops"]):
            left, right = line.split(" = ")
            assert left == f"{prev} {op} {a}"
            assert int(right) == _evaluate(prev, [[op, a]])
            prev = int(right)


def test_strict_mode_needs_marker():
    t = ArithmeticTask(_cfg(answer_format="strict", num_train=5))
    p = t.train_problems()[0]
    assert t.reward(p, f"the result is {p.answer}.") == 0.0
    assert t.reward(p, f"#### {p.answer}") == 1.0


def test_deterministic_and_seed_dependent():
    a = ArithmeticTask(_cfg(num_train=200, num_eval=20))
    b = ArithmeticTask(_cfg(num_train=200, num_eval=20))
    assert [(p.uid, p.question, p.answer) for p in a.train_problems()] == \
        [(p.uid, p.question, p.answer) for p in b.train_problems()]
    assert [p.question for p in a.eval_problems()] == [p.question for p in b.eval_problems()]
    c = ArithmeticTask(_cfg(num_train=200, num_eval=20, seed=4))
    assert [p.question for p in c.train_problems()] != [p.question for p in a.train_problems()]


def test_eval_does_not_depend_on_num_train():
    small = ArithmeticTask(_cfg(num_train=10, num_eval=30)).eval_problems()
    large = ArithmeticTask(_cfg(num_train=900, num_eval=30)).eval_problems()
    assert [p.question for p in small] == [p.question for p in large]


def test_train_eval_disjoint_and_eval_unique(train, evals):
    train_q = {p.question for p in train}
    eval_q = [p.question for p in evals]
    assert len(set(eval_q)) == len(eval_q)
    assert not train_q & set(eval_q)


def test_step_distribution_is_long_tailed(train):
    steps = [p.meta["steps"] for p in train]
    counts = Counter(steps)
    assert max(steps) == 8
    assert statistics.mean(steps) < 2.5  # geometric(0.5): mean ~2, max 8
    assert counts[1] > 0.4 * len(steps)
    # Counts fall with k (allowing noise where counts are tiny).
    for k in range(1, 6):
        assert counts[k] > counts[k + 1], counts
    # Long chain-of-thought solutions are rare but present.
    assert 0 < sum(counts[k] for k in range(6, 9)) < 0.1 * len(steps)


def test_solution_length_grows_with_steps(task, train):
    by_k = {}
    for p in train:
        by_k.setdefault(p.meta["steps"], []).append(len(task.reference_solution(p)))
    means = [statistics.mean(by_k[k]) for k in sorted(by_k)]
    assert means == sorted(means) and means[-1] > 4 * means[0]


def test_step_bounds_and_operations_respected():
    t = ArithmeticTask(_cfg(min_steps=3, max_steps=4, step_p=0.3, operations="*", max_operand=9,
                            num_train=200, num_eval=10))
    probs = t.train_problems() + t.eval_problems()
    assert {p.meta["steps"] for p in probs} == {3, 4}
    assert all(op == "*" for p in probs for op, _ in p.meta["ops"])
    assert all(abs(v) <= VALUE_LIMIT for p in probs for v in p.meta["values"])
    assert all(t.reward(p, t.reference_solution(p)) == 1.0 for p in probs)


def test_step_p_one_gives_min_steps():
    t = ArithmeticTask(_cfg(step_p=1.0, min_steps=2, num_train=50, num_eval=5))
    assert {p.meta["steps"] for p in t.train_problems()} == {2}


def test_impossible_eval_size_is_reported():
    t = ArithmeticTask(_cfg(max_operand=2, max_steps=1, operations="+", num_train=5, num_eval=50))
    with pytest.raises(ValueError, match="num_eval"):
        t.eval_problems()


def test_registry():
    assert TASKS["arithmetic"] is ArithmeticTask
    assert isinstance(build_task(_cfg(num_train=3)), ArithmeticTask)
    with pytest.raises(ValueError, match=r"'nope'.*arithmetic, gsm8k"):
        build_task(TaskConfig(name="nope"))


def test_expression_style_evaluates_left_to_right():
    from slipstream.config import TaskConfig
    from slipstream.tasks.arithmetic import ArithmeticTask, render_expression

    assert render_expression(7, [["+", 5], ["*", 3], ["-", 4]]) == "What is (7 + 5) * 3 - 4?"
    assert render_expression(7, [["*", 5], ["+", 3], ["*", 2]]) == "What is (7 * 5 + 3) * 2?"
    task = ArithmeticTask(TaskConfig(style="expression", num_train=50, num_eval=10, instruction=""))
    for p in task.train_problems() + task.eval_problems():
        expr = p.question.removeprefix("What is ").removesuffix("?")
        assert eval(expr) == int(p.answer)  # Python's precedence agrees with the parentheses
