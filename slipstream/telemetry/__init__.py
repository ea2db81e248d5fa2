"""Run telemetry: console/JSON-lines/W&B metrics, progress bars and the end-of-run report."""

from slipstream.telemetry.metrics_logger import (
    METRICS_FILE,
    ROLLOUTS_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    format_console_line,
)
from slipstream.telemetry.progress import NullProgress, progress_bar

__all__ = [
    "METRICS_FILE",
    "ROLLOUTS_FILE",
    "WANDB_ID_FILE",
    "MetricsLogger",
    "NullProgress",
    "ReportError",
    "format_console_line",
    "progress_bar",
    "read_jsonl",
    "write_report",
]


def __getattr__(name: str):
    # The report module is imported on first use so that `python -m slipstream.telemetry.report`
    # does not find it already imported by the package.
    if name in ("ReportError", "read_jsonl", "write_report"):
        from slipstream.telemetry import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
