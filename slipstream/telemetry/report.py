"""Plots and a short summary of a finished (or running) run, read from its JSON lines.

    python -m slipstream.telemetry.report runs/<name>

writes into `runs/<name>/report/`: reward.png, response_length.png, step_time.png,
rollout_timeline.png and report.md.
Figures are drawn on matplotlib's Agg canvas directly, so pyplot's global backend is left alone.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from slipstream.telemetry.metrics_logger import METRICS_FILE, ROLLOUTS_FILE

REPORT_DIR = "report"
# Recognised token counters: a running total (its last value counts) or a per-step count (summed).
_TOTAL_TOKEN_KEYS = ("tokens/total",)
_STEP_TOKEN_KEYS = ("tokens/step", "tokens/generated", "tokens/response")


class ReportError(ValueError):
    """The run directory cannot be reported on (missing, empty or malformed files)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; blank lines are skipped, anything else must be an object with a step."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReportError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                raise ReportError(f"{path}:{lineno}: expected a JSON object with a numeric 'step'")
            rows.append(row)
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every row holding a finite number under `key`, in file order."""
    steps, values = [], []
    for row in rows:
        if _is_number(row.get(key)):
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def _by_step(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Rows merged per step (later rows win on a shared key), ordered by step."""
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(int(row["step"]), {}).update(row)
    return dict(sorted(merged.items()))


def _fmt(value: float | None, fmt: str = "{:.4g}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _new_figure(width: float = 8.0, height: float = 4.5, nrows: int = 1, sharex: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, axes


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_reward(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax_r, ax_a) = _new_figure(height=6.0, nrows=2, sharex=True)
    steps, mean = _series(rows, "reward/mean")
    if steps:
        ax_r.plot(steps, mean, color="tab:blue", label="reward mean")
        per_step = _by_step(rows)
        band = [(s, r) for s, r in per_step.items() if _is_number(r.get("reward/mean"))]
        if all(_is_number(r.get("reward/std")) for _, r in band):
            xs = [s for s, _ in band]
            lo = [r["reward/mean"] - r["reward/std"] for _, r in band]
            hi = [r["reward/mean"] + r["reward/std"] for _, r in band]
            ax_r.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, label="± std")
        elif all(_is_number(r.get("reward/min")) and _is_number(r.get("reward/max")) for _, r in band):
            xs = [s for s, _ in band]
            ax_r.fill_between(xs, [r["reward/min"] for _, r in band], [r["reward/max"] for _, r in band],
                              color="tab:blue", alpha=0.2, label="min–max")
        ax_r.legend(loc="best")
        ax_r.set_ylabel("training reward")
        ax_r.grid(alpha=0.3)
    else:
        _no_data(ax_r, "no 'reward/mean' logged")
    ax_r.set_title("Reward")

    steps, acc = _series(rows, "eval/accuracy")
    if steps:
        ax_a.plot(steps, acc, color="tab:green", marker="o", label="eval accuracy")
        ax_a.set_ylabel("eval accuracy")
        ax_a.set_ylim(bottom=min(0.0, min(acc)), top=max(1.0, max(acc)))
        ax_a.grid(alpha=0.3)
        ax_a.legend(loc="best")
    else:
        _no_data(ax_a, "no 'eval/accuracy' logged")
    ax_a.set_xlabel("step")
    fig.savefig(path, dpi=100)


def _plot_lengths(rows: list[dict[str, Any]], rollouts: list[dict[str, Any]] | None, path: Path) -> None:
    fig, (ax,) = _new_figure()
    with_lengths = [r for r in rollouts or [] if r.get("response_lengths")]
    if with_lengths:
        first, last = with_lengths[0], with_lengths[-1]
        chosen = [first] if first is last else [first, last]
        values = [v for r in chosen for v in r["response_lengths"]]
        lo, hi = min(values), max(values)
        bins = min(50, max(1, hi - lo + 1))
        for row, color in zip(chosen, ("tab:blue", "tab:orange")):
            lengths = row["response_lengths"]
            mean = sum(lengths) / len(lengths)
            ax.hist(lengths, bins=bins, range=(lo, hi + 1), alpha=0.55, color=color,
                    label=f"step {row['step']} (n={len(lengths)}, mean {mean:.1f})")
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel("responses")
        ax.legend(loc="best")
        ax.set_title("Response length: first vs last step")
    else:
        steps, mean = _series(rows, "response_length/mean")
        if steps:
            ax.plot(steps, mean, color="tab:blue", marker=".")
            ax.set_xlabel("step")
            ax.set_ylabel("mean response length (tokens)")
            ax.grid(alpha=0.3)
        else:
            _no_data(ax, f"no {ROLLOUTS_FILE} and no 'response_length/mean' logged")
        ax.set_title("Response length")
    fig.savefig(path, dpi=100)


# Stacking order of the step phases, bottom first; other time/* keys follow in first-seen order.
_TIME_ORDER = ("time/rollout", "time/reward", "time/update", "time/sync", "time/eval")


def _time_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key.startswith("time/") and key != "time/step" and _is_number(value) and key not in keys:
                keys.append(key)
    known = [k for k in _TIME_ORDER if k in keys]
    return known + [k for k in keys if k not in known]


def _plot_step_time(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = _new_figure()
    per_step = _by_step(rows)
    keys = _time_keys(rows)
    steps = list(per_step)
    if keys and steps:
        width = 0.8 if len(steps) <= 200 else 1.0
        bottom = [0.0] * len(steps)
        for key in keys:
            heights = [float(per_step[s].get(key)) if _is_number(per_step[s].get(key)) else 0.0
                       for s in steps]
            ax.bar(steps, heights, width=width, bottom=bottom, label=key.removeprefix("time/"),
                   linewidth=0)
            bottom = [b + h for b, h in zip(bottom, heights)]
        total_steps, totals = _series(list(per_step.values()), "time/step")
        if total_steps:
            ax.plot(total_steps, totals, color="black", marker="_", linestyle="none", markersize=12,
                    label="step total")
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
    else:
        _no_data(ax, "no 'time/*' metrics logged")
    ax.set_title("Time per step")
    fig.savefig(path, dpi=100)


def _timelines(rollouts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Rollout rows that carry a well-formed engine timeline, in file order."""
    keys = ("start", "seconds", "live", "drafted")
    out = []
    for row in rollouts or []:
        tl = row.get("timeline")
        if isinstance(tl, dict) and all(isinstance(tl.get(k), list) for k in keys) and tl["start"] \
                and len({len(tl[k]) for k in keys}) == 1:
            out.append(row)
    return out


def _plot_timeline(rollouts: list[dict[str, Any]] | None, path: Path) -> None:
    """Live batch size over the rollout's wall clock, speculative steps marked: the first and the
    last rollout that logged a timeline."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import ScalarFormatter

    with_timeline = _timelines(rollouts)
    chosen = with_timeline[:1] + with_timeline[-1:] if len(with_timeline) > 1 else with_timeline
    fig, axes = _new_figure(height=3.2 * max(len(chosen), 1), nrows=max(len(chosen), 1))
    if not chosen:
        _no_data(axes[0], f"no rollout timeline in {ROLLOUTS_FILE}")
        axes[0].set_title("Rollout timeline")
    for ax, row in zip(axes, chosen):
        tl = row["timeline"]
        ends = [s + d for s, d in zip(tl["start"], tl["seconds"])]
        ax.step(tl["start"] + ends[-1:], tl["live"] + tl["live"][-1:], where="post", color="tab:blue",
                label="live sequences")
        spec_steps = [i for i, d in enumerate(tl["drafted"]) if d > 0]
        spans: list[list[float]] = []  # runs of consecutive speculative steps, one patch each
        for i in spec_steps:
            if spans and spans[-1][2] == i - 1:
                spans[-1][1:] = [ends[i], i]
            else:
                spans.append([tl["start"][i], ends[i], i])
        for lo, hi, _ in spans:
            ax.axvspan(lo, hi, color="tab:orange", alpha=0.35, linewidth=0)
        ax.set_yscale("log", base=2)  # the tail: halving batches get the same height
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(bottom=0.8)
        ax.set_xlabel("seconds into the rollout")
        ax.set_ylabel("live batch")
        spec_time = sum(tl["seconds"][i] for i in spec_steps)
        ax.set_title(f"Rollout timeline, step {row['step']}: {len(tl['start'])} engine steps, "
                     f"{ends[-1]:.2f} s, {spec_time:.2f} s speculative")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if spec_steps:
            handles.append(Patch(color="tab:orange", alpha=0.35, label="speculative step"))
        ax.legend(handles=handles, loc="upper right")
    fig.savefig(path, dpi=100)


def _summary(rows: list[dict[str, Any]], rollouts: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    per_step = _by_step(rows)
    _, reward = _series(rows, "reward/mean")
    _, acc = _series(rows, "eval/accuracy")

    _, step_times = _series(list(per_step.values()), "time/step")
    if not step_times:
        keys = _time_keys(rows)
        step_times = [sum(r[k] for k in keys if _is_number(r.get(k))) for r in per_step.values()
                      if any(_is_number(r.get(k)) for k in keys)]

    tokens: float | None = None
    for key in _TOTAL_TOKEN_KEYS:
        _, totals = _series(rows, key)
        if totals:
            tokens = totals[-1]
            break
    if tokens is None:
        for key in _STEP_TOKEN_KEYS:
            _, counts = _series(rows, key)
            if counts:
                tokens = sum(counts)
                break
    if tokens is None and rollouts:
        tokens = sum(sum(r.get("response_lengths") or []) for r in rollouts)

    _, drafted = _series(rows, "spec/drafted_tokens")
    _, accepted = _series(rows, "spec/accepted_tokens")
    _, spec_time = _series(rows, "spec/time_spec_steps")
    _, plain_time = _series(rows, "spec/time_plain_steps")
    speculation = "n/a"
    if drafted and sum(drafted) > 0:
        share = sum(spec_time) / max(sum(spec_time) + sum(plain_time), 1e-12)
        speculation = (f"{int(sum(accepted)):,} of {int(sum(drafted)):,} drafted tokens accepted "
                       f"({sum(accepted) / sum(drafted):.1%}); {share:.1%} of engine time in speculative steps")

    steps = list(per_step)
    return [
        ("steps logged", f"{len(steps)} ({steps[0]}–{steps[-1]})" if len(steps) > 1 else str(steps[0])),
        ("reward, first step", _fmt(reward[0] if reward else None)),
        ("reward, last step", _fmt(reward[-1] if reward else None)),
        ("eval accuracy, before", _fmt(acc[0] if acc else None)),
        ("eval accuracy, after", _fmt(acc[-1] if acc else None)),
        ("mean step time", _fmt(sum(step_times) / len(step_times) if step_times else None, "{:.2f} s")),
        ("total tokens", "n/a" if tokens is None else f"{int(tokens):,}"),
        ("speculation", speculation),
    ]


def write_report(run_dir: Path) -> list[Path]:
    """Write reward.png, response_length.png, step_time.png, rollout_timeline.png and report.md
    into `run_dir/report/`.

    Returns the paths written (the four PNGs, then report.md). Raises ReportError naming the path
    when the run directory or its metrics.jsonl is missing or empty, or a line cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"no metrics file in the run directory: {metrics_path} does not exist")
    rows = read_jsonl(metrics_path)
    if not rows:
        raise ReportError(f"{metrics_path} has no rows")
    rollouts_path = run_dir / ROLLOUTS_FILE
    rollouts = read_jsonl(rollouts_path) if rollouts_path.is_file() else None

    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    pngs = [out / "reward.png", out / "response_length.png", out / "step_time.png", out / "rollout_timeline.png"]
    _plot_reward(rows, pngs[0])
    _plot_lengths(rows, rollouts, pngs[1])
    _plot_step_time(rows, pngs[2])
    _plot_timeline(rollouts, pngs[3])

    lines = [f"# Run report: {run_dir.resolve().name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _summary(rows, rollouts)]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in pngs), ""]
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return [*pngs, md]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m slipstream.telemetry.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        paths = write_report(Path(args[0]))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
