import json
from pathlib import Path

import matplotlib.image
import pytest

from slipstream.config import LoggerConfig
from slipstream.telemetry import METRICS_FILE, ROLLOUTS_FILE, MetricsLogger, ReportError, write_report
from slipstream.telemetry.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir: Path, steps: int = 6, rollouts: bool = True) -> Path:
    cfg = LoggerConfig(console=False, wandb=False)
    with MetricsLogger(run_dir, cfg, {}, "report-test") as logger:
        logger.log(0, {"eval/accuracy": 0.25, "time/eval": 4.0})
        for step in range(1, steps + 1):
            logger.log(step, {
                "reward/mean": 0.1 * step, "reward/std": 0.05, "response_length/mean": 40.0 + step,
                "time/rollout": 2.0, "time/reward": 0.25, "time/update": 3.0, "time/step": 5.5,
                "tokens/step": 100,
            })
            if rollouts:
                logger.log_rollouts(step, [10 * step + i for i in range(8)], [float(i % 2) for i in range(8)])
            if step == steps // 2:
                logger.log(step, {"eval/accuracy": 0.5, "time/eval": 4.0})
        logger.log(steps, {"eval/accuracy": 0.625, "time/eval": 4.0})
    return run_dir


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_report_writes_plots_and_summary(tmp_path):
    run = make_run(tmp_path / "run")
    paths = write_report(run)
    report = run / "report"
    assert paths == [report / "reward.png", report / "response_length.png", report / "step_time.png",
                     report / "rollout_timeline.png", report / "report.md"]
    for png in paths[:4]:
        assert_png(png)

    md = (report / "report.md").read_text()
    rows = dict(line.strip("|").split("|")[:2] for line in md.splitlines() if line.startswith("| "))
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["eval accuracy, before"] == "0.25"
    assert rows["eval accuracy, after"] == "0.625"
    assert rows["reward, first step"] == "0.1"
    assert rows["reward, last step"] == "0.6"
    assert rows["mean step time"] == "5.50 s"
    assert rows["total tokens"] == "600"
    for png in ("reward.png", "response_length.png", "step_time.png", "rollout_timeline.png"):
        assert f"]({png})" in md
    assert rows["speculation"] == "n/a"


def test_report_without_rollouts_or_timings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("\n".join(json.dumps({"step": s, "reward/mean": s / 2}) for s in range(3)))
    paths = write_report(run)
    for png in paths[:4]:
        assert_png(png)
    md = paths[-1].read_text()
    assert "| eval accuracy, before | n/a |" in md
    assert "| total tokens | n/a |" in md


def test_token_total_from_rollouts(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, LoggerConfig(console=False, wandb=False), {}, "t") as logger:
        for step in (1, 2):
            logger.log(step, {"reward/mean": 0.5, "time/rollout": 1.0, "time/update": 2.0})
            logger.log_rollouts(step, [3, 4], [1.0, 0.0])
    md = write_report(run)[-1].read_text()
    assert "| total tokens | 14 |" in md
    assert "| mean step time | 3.00 s |" in md  # no time/step: the sum of the parts


def test_missing_run_dir_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match="run directory not found") as err:
        write_report(missing)
    assert str(missing) in str(err.value)
    assert isinstance(err.value, ValueError)
    assert main([str(missing)]) == 1


def test_missing_or_empty_metrics_is_named(tmp_path):
    with pytest.raises(ReportError) as err:
        write_report(tmp_path)
    assert str(tmp_path / METRICS_FILE) in str(err.value)

    (tmp_path / METRICS_FILE).write_text("\n\n")
    with pytest.raises(ReportError, match="has no rows") as err:
        write_report(tmp_path)
    assert str(tmp_path / METRICS_FILE) in str(err.value)
    assert not (tmp_path / "report").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    make_run(tmp_path, steps=2)
    path = tmp_path / METRICS_FILE
    lines = path.read_text().splitlines()
    lines.insert(2, '{"step": 3, "reward')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match="malformed JSON line") as err:
        write_report(tmp_path)
    assert f"{path}:3:" in str(err.value)

    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ReportError) as err:
        write_report(tmp_path)
    assert f"{path}:2:" in str(err.value)

    path.write_text('{"step": 1, "reward/mean": 1}\n')
    (tmp_path / ROLLOUTS_FILE).write_text("not json\n")
    with pytest.raises(ReportError) as err:
        write_report(tmp_path)
    assert f"{tmp_path / ROLLOUTS_FILE}:1:" in str(err.value)


def test_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run", steps=2)
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("report.md")


def test_rollout_timeline_plot_and_speculation_summary(tmp_path):
    from slipstream.rollout.timeline import Timeline
    from slipstream.telemetry.report import _timelines

    run = tmp_path / "run"
    timeline = Timeline()
    for i, live in enumerate([40, 40, 20, 9, 3, 1]):  # the batch drains; the tail speculates
        timeline.record(0.1 * i, 0.1 * i + 0.05, live, emitted=live, drafted=4 * live if live < 16 else 0,
                        accepted=2 * live if live < 16 else 0, verified_seqs=live if live < 16 else 0)
    metrics = timeline.metrics((1, 2, 4, 8, 16, 32))
    assert metrics["spec/drafted_tokens"] == 52 and metrics["spec/accepted_tokens"] == 26
    assert metrics["spec/accept_len"] == 3.0 and metrics["spec/accept_len/bs8"] == 3.0
    assert metrics["rollout/time_below_batch_16"] == pytest.approx(0.15)
    with MetricsLogger(run, LoggerConfig(console=False, wandb=False), {}, "t") as logger:
        logger.log(1, {"reward/mean": 0.5, **metrics})
        logger.log_rollouts(1, [3, 4], [1.0, 0.0], timeline=timeline.to_columns())
        logger.log_rollouts(2, [3, 4], [1.0, 0.0], timeline={"start": [0.0], "live": [1]})  # malformed: skipped
    rollouts = [json.loads(line) for line in (run / ROLLOUTS_FILE).read_text().splitlines()]
    assert [r["step"] for r in _timelines(rollouts)] == [1]
    assert rollouts[0]["timeline"]["live"] == [40, 40, 20, 9, 3, 1]
    paths = write_report(run)
    assert_png(paths[3])
    md = paths[-1].read_text()
    assert "| speculation | 26 of 52 drafted tokens accepted (50.0%); 50.0% of engine time in speculative steps |" in md
