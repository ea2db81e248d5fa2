"""Per-step metrics: a compact console line, JSON lines in the run directory, and W&B.

Files written under `run_dir`:

* `metrics.jsonl`  one object per `log()` call: `{"step": int, "time": unix_seconds, **metrics}`
* `rollouts.jsonl` one object per `log_rollouts()` call: step, time, response_lengths, rewards
* `wandb_id.txt`   the W&B run id, reused on resume so the same W&B run continues
* `wandb/`         W&B's own files (`offline-run-*` directories in offline mode)

Telemetry never stops training: if W&B cannot be imported, initialised or written to, a single
warning is issued and the logger carries on with the console and the JSON lines.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from slipstream.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
WANDB_ID_FILE = "wandb_id.txt"

# (key, label, format) shown on the console line, in this order, when present. Timings are
# grouped at the end without separators: "rollout 12.3s update 20.1s total 33.0s".
_CONSOLE_KEYS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", "{:.3f}"),
    ("eval/accuracy", "acc", "{:.3f}"),
    ("response_length/mean", "len", "{:.1f}"),
    ("mismatch/kl", "kl", "{:.3g}"),
)
_CONSOLE_TIMES: tuple[tuple[str, str], ...] = (
    ("time/rollout", "rollout"),
    ("time/update", "update"),
    ("time/eval", "eval"),
    ("time/step", "total"),
)
_CONSOLE_FALLBACK_ITEMS = 4


def _scalar(value: Any) -> Any:
    """Plain JSON-friendly value: tensors and numpy scalars become Python numbers."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, (list, tuple)):
        return [_scalar(v) for v in value]
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_number(value: float, fmt: str = "{:.4g}") -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def format_console_line(step: int, metrics: dict[str, Any]) -> str:
    """`step 3 | reward 0.410 | acc 0.380 | len 57.2 | kl 0.0012 | rollout 12.3s update 20.1s`.

    Shows a fixed set of known keys; when none of them is present, the first few numeric metrics.
    """
    parts = [f"step {step}"]
    for key, label, fmt in _CONSOLE_KEYS:
        if _is_number(metrics.get(key)):
            parts.append(f"{label} {_format_number(metrics[key], fmt)}")
    times = [f"{label} {_format_number(metrics[key], '{:.1f}')}s"
             for key, label in _CONSOLE_TIMES if _is_number(metrics.get(key))]
    if times:
        parts.append(" ".join(times))
    if len(parts) == 1:
        shown = [(k, v) for k, v in metrics.items() if _is_number(v)][:_CONSOLE_FALLBACK_ITEMS]
        parts.extend(f"{k} {_format_number(v)}" for k, v in shown)
    return " | ".join(parts)


def _row_step(line: str) -> int | None:
    try:
        row = json.loads(line)
        return int(row["step"])
    except (ValueError, TypeError, KeyError):
        return None


class MetricsLogger:
    """Writes each step's metrics to the console, `run_dir/metrics.jsonl` and W&B.

    `resume=False` starts a fresh record: existing `metrics.jsonl` / `rollouts.jsonl` are emptied
    and a new W&B run id is drawn. `resume=True` appends to them and continues the W&B run named
    in `wandb_id.txt`; the caller then calls `truncate_after(step)` with the step of the
    checkpoint it resumed from, so steps that are about to be redone are not recorded twice.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_config: dict, run_name: str,
                 resume: bool = False):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.run_name = run_name
        self.resume = resume
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.rollouts_path = self.run_dir / ROLLOUTS_FILE
        self._files: dict[Path, Any] = {}
        self._wandb_run = None
        self._wandb_warned = False
        self._closed = False
        if cfg.jsonl and not resume:
            for path in (self.metrics_path, self.rollouts_path):
                if path.exists():
                    path.write_text("")
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self._init_wandb(run_config)

    # ------------------------------------------------------------------ wandb
    @property
    def wandb_run(self):
        """The live W&B run, or None when W&B is off or failed to start."""
        return self._wandb_run

    def _warn_wandb(self, what: str, err: BaseException | str) -> None:
        if not self._wandb_warned:
            self._wandb_warned = True
            warnings.warn(f"wandb {what} failed ({err}); continuing without wandb "
                          f"(metrics are still written to {self.metrics_path})", RuntimeWarning,
                          stacklevel=3)

    def _wandb_id(self) -> str:
        id_path = self.run_dir / WANDB_ID_FILE
        if self.resume and id_path.exists():
            run_id = id_path.read_text().strip()
            if run_id:
                return run_id
        run_id = secrets.token_hex(4)
        id_path.write_text(run_id + "\n")
        return run_id

    def _init_wandb(self, run_config: dict) -> None:
        mode = self.cfg.wandb_mode
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode != "online":
            # Offline runs must not reach any server, including W&B's crash reporter.
            os.environ["WANDB_ERROR_REPORTING"] = "false"
        try:
            import wandb
        except Exception as err:  # noqa: BLE001 - any import problem disables wandb only
            self._warn_wandb("import", err)
            return
        try:
            if mode == "online" and not self._wandb_has_credentials(wandb):
                self._warn_wandb("login", "no API key configured: set WANDB_API_KEY or run "
                                 "`wandb login`, or use logger.wandb_mode=offline")
                return
            self._wandb_run = wandb.init(
                project=self.cfg.wandb_project,
                name=self.run_name,
                dir=str(self.run_dir),
                mode=mode,
                config=run_config,
                id=self._wandb_id(),
                resume="allow",
                settings=self._wandb_settings(wandb),
            )
        except Exception as err:  # noqa: BLE001
            self._wandb_run = None
            self._warn_wandb("init", err)

    @staticmethod
    def _wandb_settings(wandb):
        wanted = {"silent": True, "quiet": True, "console": "off", "show_info": False,
                  "show_warnings": False}
        fields = getattr(wandb.Settings, "model_fields", None)
        if fields is not None:
            wanted = {k: v for k, v in wanted.items() if k in fields}
        try:
            return wandb.Settings(**wanted)
        except Exception:  # noqa: BLE001 - an older Settings without some of these fields
            return wandb.Settings(silent=True)

    @staticmethod
    def _wandb_has_credentials(wandb) -> bool:
        """True if an API key is configured; checked without prompting or contacting the server."""
        import inspect

        try:
            params = inspect.signature(wandb.login).parameters
        except (TypeError, ValueError):
            params = {}
        if "prompt" in params:
            return bool(wandb.login(prompt=False, verify=False))
        if os.environ.get("WANDB_API_KEY"):
            return True
        import netrc

        try:
            return netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            return False

    # ------------------------------------------------------------------ files
    def _append(self, path: Path, row: dict[str, Any]) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "a", encoding="utf-8")
        f.write(json.dumps(row) + "\n")
        f.flush()

    def truncate_after(self, step: int) -> int:
        """Drop rows with a step greater than `step` from metrics.jsonl and rollouts.jsonl.

        Call it on resume with the checkpoint's step, before logging the next step. Unreadable
        lines (a row cut short by a crash) are dropped too. Returns the number of rows dropped.
        """
        dropped = 0
        for path in (self.metrics_path, self.rollouts_path):
            f = self._files.pop(path, None)
            if f is not None:
                f.close()
            if not path.exists():
                continue
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = []
            for line in lines:
                if not line.strip():
                    continue
                row_step = _row_step(line)
                if row_step is not None and row_step <= step:
                    kept.append(line)
                else:
                    dropped += 1
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        return dropped

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: dict[str, float]) -> None:
        step = int(step)
        clean = {k: _scalar(v) for k, v in metrics.items() if k not in ("step", "time")}
        if self.cfg.jsonl:
            self._append(self.metrics_path, {"step": step, "time": time.time(), **clean})
        if self.cfg.console:
            from tqdm import tqdm

            tqdm.write(format_console_line(step, clean), file=sys.stdout)
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(clean, step=step)
            except Exception as err:  # noqa: BLE001
                self._warn_wandb("log", err)
                self._finish_wandb(exit_code=1)

    def log_rollouts(self, step: int, response_lengths: Iterable[int], rewards: Iterable[float],
                     timeline: dict[str, list] | None = None) -> None:
        """Record every response's length and reward of one step (for the report's histograms) and,
        when given, the rollout's engine-step timeline (columns of `rollout.timeline.StepRecord`)."""
        if not self.cfg.jsonl:
            return
        row = {
            "step": int(step),
            "time": time.time(),
            "response_lengths": [int(_scalar(x)) for x in response_lengths],
            "rewards": [float(_scalar(x)) for x in rewards],
        }
        if timeline is not None:
            row["timeline"] = timeline
        self._append(self.rollouts_path, row)

    # ------------------------------------------------------------------ lifetime
    def _finish_wandb(self, exit_code: int | None = None) -> None:
        run, self._wandb_run = self._wandb_run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            self._warn_wandb("finish", err)

    def close(self, exit_code: int | None = None) -> None:
        """Close the files and finish the W&B run. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._finish_wandb(exit_code)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=1 if exc_type is not None else None)
