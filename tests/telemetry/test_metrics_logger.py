import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from slipstream.config import LoggerConfig
from slipstream.telemetry import (
    METRICS_FILE,
    ROLLOUTS_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    NullProgress,
    format_console_line,
    progress_bar,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def local_cfg(**kw) -> LoggerConfig:
    """No W&B, no console: just the JSON lines."""
    return LoggerConfig(**{"console": False, "wandb": False, **kw})


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_round_trip(tmp_path):
    metrics = [
        {"reward/mean": 0.5, "eval/accuracy": 0.25, "response_length/mean": 57.25},
        {"reward/mean": 0.75, "loss": -1.5e-3, "count": 7},
    ]
    with MetricsLogger(tmp_path / "run", local_cfg(), {"lr": 1e-6}, "rt") as logger:
        logger.log(1, metrics[0])
        logger.log(2, {**metrics[1], "tensor": torch.tensor(2.5)})
        # each line is flushed: readable before close
        assert len(read_rows(tmp_path / "run" / METRICS_FILE)) == 2
        logger.log_rollouts(2, [3, 5, torch.tensor(8)], [1.0, 0.0, 1])

    rows = read_rows(tmp_path / "run" / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in rows)
    assert {k: v for k, v in rows[0].items() if k not in ("step", "time")} == metrics[0]
    assert {k: v for k, v in rows[1].items() if k not in ("step", "time")} == {**metrics[1], "tensor": 2.5}
    assert list(rows[0])[:2] == ["step", "time"]

    (rollout,) = read_rows(tmp_path / "run" / ROLLOUTS_FILE)
    assert rollout["step"] == 2
    assert rollout["response_lengths"] == [3, 5, 8]
    assert rollout["rewards"] == [1.0, 0.0, 1.0]


def test_console_line(capsys):
    line = format_console_line(3, {
        "reward/mean": 0.41, "eval/accuracy": 0.38, "response_length/mean": 57.2, "mismatch/kl": 0.0012,
        "time/rollout": 12.3, "time/update": 20.1, "other": 9.0,
    })
    assert line == "step 3 | reward 0.410 | acc 0.380 | len 57.2 | kl 0.0012 | rollout 12.3s update 20.1s"
    # none of the known keys: the first few numeric ones instead
    assert format_console_line(4, {"a": 1.5, "b": "text", "c": 2, "d": 3, "e": 4, "f": 5}) == \
        "step 4 | a 1.5 | c 2 | d 3 | e 4"


def test_console_output_follows_config(tmp_path, capsys):
    with MetricsLogger(tmp_path / "a", local_cfg(console=True), {}, "a") as logger:
        logger.log(3, {"reward/mean": 0.5, "time/step": 1.25})
    assert capsys.readouterr().out.strip() == "step 3 | reward 0.500 | total 1.2s"

    with MetricsLogger(tmp_path / "b", local_cfg(console=False), {}, "b") as logger:
        logger.log(3, {"reward/mean": 0.5})
    assert capsys.readouterr().out == ""


def test_jsonl_off_writes_no_files(tmp_path):
    with MetricsLogger(tmp_path / "run", local_cfg(jsonl=False), {}, "off") as logger:
        logger.log(1, {"reward/mean": 1.0})
        logger.log_rollouts(1, [1], [1.0])
        assert logger.truncate_after(0) == 0
    assert list((tmp_path / "run").iterdir()) == []


def test_resume_truncation_removes_later_steps(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, local_cfg(), {}, "r") as logger:
        for step in range(1, 6):
            logger.log(step, {"reward/mean": step / 10})
            logger.log_rollouts(step, [step], [0.0])
        logger.log(5, {"eval/accuracy": 0.5})
    # a row cut short by a crash
    with open(run / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "rew')

    # resumed from the checkpoint of step 3: steps 4, 5 (and the broken row) are redone
    with MetricsLogger(run, local_cfg(), {}, "r", resume=True) as logger:
        assert logger.truncate_after(3) == 6  # metrics 4, 5, 5(eval), broken row; rollouts 4, 5
        assert [r["step"] for r in read_rows(run / METRICS_FILE)] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, {"reward/mean": step})
            logger.log_rollouts(step, [step], [1.0])

    rows = read_rows(run / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["reward/mean"] for r in rows] == [0.1, 0.2, 0.3, 4, 5, 6]
    assert [r["step"] for r in read_rows(run / ROLLOUTS_FILE)] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_replaces_old_records(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, local_cfg(), {}, "x") as logger:
        logger.log(1, {"reward/mean": 0.0})
        logger.log_rollouts(1, [1], [0.0])
    with MetricsLogger(run, local_cfg(), {}, "x", resume=False) as logger:
        logger.log(1, {"reward/mean": 1.0})
    assert [r["reward/mean"] for r in read_rows(run / METRICS_FILE)] == [1.0]
    assert (run / ROLLOUTS_FILE).read_text() == ""


@pytest.mark.parametrize("cfg", [LoggerConfig(console=False, wandb=True, wandb_mode="disabled"),
                                 LoggerConfig(console=False, wandb=False, wandb_mode="offline")])
def test_disabled_wandb_writes_nothing(tmp_path, monkeypatch, cfg):
    def no_import(*args, **kwargs):
        raise AssertionError("wandb must not be used")

    fake = types.ModuleType("wandb")
    fake.init = no_import
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, cfg, {}, "d") as logger:
        assert logger.wandb_run is None
        logger.log(1, {"reward/mean": 1.0})
    assert not (tmp_path / "wandb").exists()
    assert not (tmp_path / WANDB_ID_FILE).exists()
    assert (tmp_path / METRICS_FILE).exists()


class FakeRun:
    def __init__(self, fail_log=False):
        self.logged, self.finished, self.fail_log = [], [], fail_log

    def log(self, data, step=None):
        if self.fail_log:
            raise RuntimeError("disk full")
        self.logged.append((step, data))

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


def fake_wandb(monkeypatch, run=None, init_error=None):
    mod = types.ModuleType("wandb")
    mod.calls = []

    class Settings:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    def init(**kwargs):
        mod.calls.append(kwargs)
        if init_error is not None:
            raise init_error
        return run

    mod.Settings, mod.init = Settings, init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_init_arguments_and_stable_id(tmp_path, monkeypatch):
    run = FakeRun()
    wandb = fake_wandb(monkeypatch, run)
    cfg = LoggerConfig(console=False, wandb_project="proj")
    with MetricsLogger(tmp_path, cfg, {"lr": 0.1}, "name") as logger:
        logger.log(2, {"reward/mean": 0.5})
    kwargs = wandb.calls[0]
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert kwargs["id"] == run_id and run_id
    assert kwargs | {"settings": None} == {
        "project": "proj", "name": "name", "dir": str(tmp_path), "mode": "offline",
        "config": {"lr": 0.1}, "resume": "allow", "id": run_id, "settings": None}
    assert kwargs["settings"].kwargs["silent"] is True and kwargs["settings"].kwargs["console"] == "off"
    assert os.environ["WANDB_SILENT"] == "true"
    assert run.logged == [(2, {"reward/mean": 0.5})]
    assert run.finished == [None]

    MetricsLogger(tmp_path, cfg, {}, "name", resume=True).close()
    assert wandb.calls[1]["id"] == run_id  # the resumed run continues the same W&B run
    MetricsLogger(tmp_path, cfg, {}, "name", resume=False).close()
    assert wandb.calls[2]["id"] != run_id  # a fresh run gets a new one


def test_wandb_failures_warn_once_and_training_continues(tmp_path, monkeypatch):
    fake_wandb(monkeypatch, init_error=RuntimeError("no service"))
    with pytest.warns(RuntimeWarning, match="wandb init failed"):
        logger = MetricsLogger(tmp_path / "a", LoggerConfig(console=False), {}, "a")
    assert logger.wandb_run is None
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    assert len(read_rows(tmp_path / "a" / METRICS_FILE)) == 1

    run = FakeRun(fail_log=True)
    fake_wandb(monkeypatch, run)
    with pytest.warns(RuntimeWarning, match="wandb log failed") as record:
        with MetricsLogger(tmp_path / "b", LoggerConfig(console=False), {}, "b") as logger:
            for step in range(3):
                logger.log(step, {"reward/mean": 1.0})
    assert len(record) == 1
    assert run.finished == [1] and logger.wandb_run is None
    assert len(read_rows(tmp_path / "b" / METRICS_FILE)) == 3


WANDB_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from slipstream.config import LoggerConfig
    from slipstream.telemetry import MetricsLogger

    assert sys.stdin is None  # stdin is closed: any prompt would fail
    run_dir, resume = Path(sys.argv[1]), sys.argv[2] == "resume"
    with MetricsLogger(run_dir, LoggerConfig(console=False), {"lr": 1e-6}, "offline-test",
                       resume=resume) as logger:
        assert logger.wandb_run is not None
        logger.truncate_after(1)
        for step in (2, 3) if resume else (1, 2):
            logger.log(step, {"reward/mean": step / 4})
    print("done")
""")


def test_wandb_offline_writes_run_dir_and_never_prompts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO_ROOT), NETRC=str(tmp_path / "no-netrc"))
    run_dir = tmp_path / "run"
    for mode in ("new", "resume"):
        proc = subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(run_dir), mode], env=env,
                              preexec_fn=lambda: os.close(0), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "done"
        assert "wandb:" not in proc.stdout + proc.stderr  # silent

    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir())
    assert len(offline) == 2
    assert all(name.endswith(f"-{run_id}") for name in offline)  # the resumed run kept its id
    assert [r["step"] for r in read_rows(run_dir / METRICS_FILE)] == [1, 2, 3]


def test_progress_bar(capsys):
    bar = progress_bar(3, "gen", enabled=False)
    assert isinstance(bar, NullProgress)
    bar.update(2)
    bar.set_postfix(acc=0.5)
    bar.close()
    assert capsys.readouterr() == ("", "")

    bar = progress_bar(3, "gen", unit="tok")
    for _ in range(3):
        bar.update()
    bar.set_postfix(acc=0.5)
    assert bar.n == 3 and bar.unit == "tok" and bar.total == 3
    bar.close()
    assert capsys.readouterr().out == ""  # bars go to stderr
