import json

import pytest

from slipstream.config import TaskConfig
from slipstream.tasks import TaskDataError, build_task
from slipstream.tasks.gsm8k import Gsm8kTask, question_uid


def _records(n, start=0):
    return [
        {"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
         "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2:,}"}
        for i in range(start, start + n)
    ]


def _write_jsonl(path, records, blank_lines=False):
    lines = []
    for r in records:
        lines.append(json.dumps(r))
        if blank_lines:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({k: [r.get(k) for r in records] for k in ("question", "answer")})
    pq.write_table(table, path)
    return path


def _cfg(path, **kw):
    base = dict(name="gsm8k", path=str(path), num_train=10_000, num_eval=10_000, eval_fraction=0.25)
    base.update(kw)
    return TaskConfig(**base)


def test_jsonl_loading(tmp_path):
    recs = _records(40)
    recs.append({"question": "A shop sells 1,000 pens.", "answer": "So many.\n#### 1,000"})
    path = _write_jsonl(tmp_path / "data.jsonl", recs, blank_lines=True)
    task = build_task(_cfg(path))
    assert isinstance(task, Gsm8kTask)
    probs = task.train_problems() + task.eval_problems()
    assert len(probs) == 41
    by_q = {p.question.split("\n")[0]: p for p in probs}
    pens = by_q["A shop sells 1,000 pens."]
    assert pens.answer == "1000"
    assert pens.meta["solution"] == "So many.\n#### 1,000"
    assert pens.uid == question_uid("A shop sells 1,000 pens.")
    assert pens.uid.startswith("gsm8k-") and len(pens.uid) == len("gsm8k-") + 12
    p7 = by_q[recs[7]["question"]]
    assert p7.answer == "16"
    assert p7.question == recs[7]["question"] + "\n" + TaskConfig().instruction
    assert len({p.uid for p in probs}) == 41


def test_reward_and_reference(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(10))
    task = Gsm8kTask(_cfg(path, eval_fraction=0.0))
    p = task.train_problems()[3]
    assert p.answer == "8"
    assert task.reward(p, task.reference_solution(p)) == 1.0
    assert task.reward(p, "... #### 9") == 0.0
    assert task.reward(p, "so the total is 8.") == 1.0
    strict = Gsm8kTask(_cfg(path, eval_fraction=0.0, answer_format="strict"))
    assert strict.reward(p, "so the total is 8.") == 0.0


def test_no_instruction(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(3))
    p = Gsm8kTask(_cfg(path, instruction="", eval_fraction=0.0)).train_problems()[0]
    assert p.question == _records(1)[0]["question"]


def test_parquet_matches_jsonl(tmp_path):
    recs = _records(30)
    pj = Gsm8kTask(_cfg(_write_jsonl(tmp_path / "d.jsonl", recs)))
    pp = Gsm8kTask(_cfg(_write_parquet(tmp_path / "d.parquet", recs)))
    key = lambda ps: [(p.uid, p.question, p.answer, p.meta["solution"]) for p in ps]  # noqa: E731
    assert key(pj.train_problems()) == key(pp.train_problems())
    assert key(pj.eval_problems()) == key(pp.eval_problems())
    assert len(pp.train_problems()) + len(pp.eval_problems()) == 30


def test_eval_split_disjoint_stable_and_sized(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(400))
    a = Gsm8kTask(_cfg(path, seed=0))
    b = Gsm8kTask(_cfg(path, seed=1))
    train, evals = a.train_problems(), a.eval_problems()
    assert {p.question for p in train}.isdisjoint({p.question for p in evals})
    assert len(train) + len(evals) == 400
    assert 60 <= len(evals) <= 140  # ~25% of 400
    assert [p.uid for p in evals] == [p.uid for p in b.eval_problems()]
    # The split is a property of each question: reordering the file does not move questions.
    shuffled = _write_jsonl(tmp_path / "r.jsonl", list(reversed(_records(400))))
    c = Gsm8kTask(_cfg(shuffled))
    assert {p.uid for p in c.eval_problems()} == {p.uid for p in evals}
    # Caps take the first N of each split in file order.
    capped = Gsm8kTask(_cfg(path, num_train=5, num_eval=3))
    assert [p.uid for p in capped.train_problems()] == [p.uid for p in train[:5]]
    assert [p.uid for p in capped.eval_problems()] == [p.uid for p in evals[:3]]


def test_explicit_eval_path_excludes_overlap(tmp_path):
    train_path = _write_jsonl(tmp_path / "train.jsonl", _records(20))
    eval_path = _write_jsonl(tmp_path / "test.jsonl", _records(10, start=15))
    task = Gsm8kTask(_cfg(train_path, eval_path=str(eval_path)))
    train, evals = task.train_problems(), task.eval_problems()
    assert len(evals) == 10
    assert len(train) == 15  # records 15..19 also appear in the eval file
    assert {p.question for p in train}.isdisjoint({p.question for p in evals})


def test_duplicate_questions_kept_once(tmp_path):
    recs = _records(5)
    path = _write_jsonl(tmp_path / "d.jsonl", recs + recs[:2])
    task = Gsm8kTask(_cfg(path, eval_fraction=0.0))
    assert len(task.train_problems()) == 5


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "q", "answer": "#### 1"', "invalid JSON"),
        ('[1, 2]', "JSON object"),
        ('{"answer": "#### 3"}', "missing field 'question'"),
        ('{"question": "q", "answer": 3}', "'answer' must be a string"),
        ('{"question": "q", "answer": "three"}', "####"),
        ('{"question": "q", "answer": "#### three"}', "####"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = [json.dumps(r) for r in _records(3)]
    path = tmp_path / "file.jsonl"
    path.write_text("\n".join([good[0], good[1], bad_line, good[2]]) + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError) as err:
        Gsm8kTask(_cfg(path)).train_problems()
    assert "file.jsonl:3" in str(err.value)
    assert message in str(err.value)


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text(json.dumps(_records(1)[0]) + "\n\n\nnot json\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"file\.jsonl:4: invalid JSON"):
        Gsm8kTask(_cfg(path)).eval_problems()


def test_malformed_parquet_names_row(tmp_path):
    recs = _records(4)
    recs[2] = {"question": "q", "answer": "no marker"}
    path = _write_parquet(tmp_path / "bad.parquet", recs)
    with pytest.raises(TaskDataError, match=r"bad\.parquet:row 3: .*####"):
        Gsm8kTask(_cfg(path)).train_problems()
    recs[2] = {"question": None, "answer": "#### 1"}
    path = _write_parquet(tmp_path / "null.parquet", recs)
    with pytest.raises(TaskDataError, match=r"null\.parquet:row 3: missing field 'question'"):
        Gsm8kTask(_cfg(path)).train_problems()


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"question": ["q"], "solution": ["#### 1"]}), path)
    with pytest.raises(TaskDataError, match=r"cols\.parquet: missing column\(s\) 'answer'"):
        Gsm8kTask(_cfg(path)).train_problems()


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(TaskDataError, match="nowhere.jsonl: file not found"):
        Gsm8kTask(_cfg(path)).train_problems()
    with pytest.raises(TaskDataError, match="task.path"):
        Gsm8kTask(TaskConfig(name="gsm8k")).train_problems()


def test_parquet_without_pyarrow_is_explained(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(TaskDataError, match="x.parquet: reading parquet needs pyarrow"):
        Gsm8kTask(_cfg(path)).train_problems()
