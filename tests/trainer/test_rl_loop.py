import json
import os
import signal
import subprocess
import sys
import time

from slipstream.config import compose
from slipstream.trainer.rl_loop import PromptStream, train


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_recipe_end_to_end(tmp_path):
    cfg = compose(["recipe=smoke", f"trainer.run_dir={tmp_path}", "logger.wandb=false"])
    out = train(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    for key in ("reward/mean", "loss", "grad_norm", "mismatch/kl", "response_length/mean", "time/rollout",
                "time/update", "time/reward", "time/sync"):
        assert key in rows[1], key
    assert 0 < rows[1]["response_length/mean"] <= cfg.rollout.max_tokens
    assert (tmp_path / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    assert out["eval/accuracy"] == rows[-1]["eval/accuracy"]
    for png in ("reward.png", "response_length.png", "step_time.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


def test_prompt_stream_is_a_resumable_permutation():
    items = list(range(10))
    a = PromptStream(items, seed=3)
    first = a.take(7) + a.take(7)
    assert sorted(first[:10]) == items  # one full epoch before anything repeats
    b = PromptStream(items, seed=3)
    b.take(7)
    c = PromptStream(items, seed=3, epoch=b.epoch, position=b.position)
    assert c.take(7) == first[7:]


def _launch(run_dir, steps):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "slipstream.cli", "train", "recipe=smoke", f"trainer.run_dir={run_dir}",
         f"trainer.steps={steps}", "trainer.save_every=2", "logger.wandb=false",
         # The random model earns no reward (no gradient); weight decay still moves the weights every
         # step, so the resumed run must really restore them (and hand them to the engine).
         "trainer.lr=0.01", "trainer.weight_decay=0.5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    p = _launch(full, 6)
    assert p.wait(timeout=300) == 0, p.stdout.read()
    p = _launch(broken, 6)
    marker = broken / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert marker.exists()
    p = _launch(broken, 6)
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log
    assert "resumed from" in log
    a, b = _rows(full), _rows(broken)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        # mismatch/kl_max also shows that the resumed engine generates with the checkpoint's weights
        for key in ("reward/mean", "response_length/mean", "loss", "grad_norm", "eval/accuracy", "mismatch/kl_max"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (ra["step"], key, ra[key], rb[key])


def test_native_engine_rollouts_train_and_sync(tmp_path):
    cfg = compose(["recipe=smoke", "rollout=native", f"trainer.run_dir={tmp_path}", "logger.wandb=false",
                   "trainer.steps=2", "rollout.n=4", "rollout.max_tokens=24", "rollout.eval_max_tokens=24"])
    train(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["time/sync"] > 0
        # fp32 engine and fp32 trainer: the rollout log-probs are the trainer's up to rounding
        assert r["mismatch/kl_max"] < 1e-4


def test_blasst_rollouts_log_their_sparsity(tmp_path):
    cfg = compose(["recipe=smoke", "attention=blasst", "attention.decode_scale=1e6", f"trainer.run_dir={tmp_path}",
                   "logger.wandb=false", "trainer.steps=1", "rollout.n=2", "task.num_eval=2"])
    train(cfg)
    row = _rows(tmp_path)[1]
    assert 0.0 <= row["attention/sparsity_decode"] <= 1.0 and "mismatch/kl" in row


def test_a_non_finite_loss_stops_the_run_naming_the_checkpoint(tmp_path, monkeypatch):
    import pytest

    from slipstream.trainer import algorithms
    from slipstream.trainer.rl_loop import TrainingError

    real = algorithms.POLICY_LOSSES["clipped"]
    calls = {"n": 0}

    def poisoned(logprobs, *args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(logprobs, *args, **kwargs)
        return (loss * float("nan") if calls["n"] > 1 else loss), metrics  # step 1 fine, then NaN

    monkeypatch.setitem(algorithms.POLICY_LOSSES, "clipped", poisoned)
    cfg = compose(["recipe=smoke", f"trainer.run_dir={tmp_path}", "logger.wandb=false", "trainer.micro_batch_size=16",
                   "trainer.save_every=1"])
    with pytest.raises(TrainingError, match="step_000001"):
        train(cfg)
    assert (tmp_path / "checkpoints" / "step_000001" / "COMPLETE").is_file()
    assert not (tmp_path / "checkpoints" / "step_000002").exists()


def test_profiled_steps_write_a_trace_and_an_operator_table(tmp_path):
    import gzip

    cfg = compose(["recipe=smoke", "rollout=native", f"trainer.run_dir={tmp_path}", "logger.wandb=false",
                   "trainer.steps=2", "trainer.profile_steps=[2]", "rollout.n=2", "rollout.max_tokens=8",
                   "rollout.eval_max_tokens=8", "task.num_eval=2"])
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["step2-rank0.json.gz", "step2-rank0.txt"]
    trace = json.loads(gzip.open(tmp_path / "profile" / "step2-rank0.json.gz").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"rollout", "reward", "update", "sync"} <= names
    assert any(str(n).startswith("aten::") for n in names)
    table = (tmp_path / "profile" / "step2-rank0.txt").read_text()
    assert "step 2, rank 0" in table and "aten::" in table
