"""torch.profiler over chosen RL steps (`trainer.profile_steps`): where a step's time goes, per rank.

Each profiled step writes, under `<run_dir>/profile/`, a Chrome trace (`step{N}-rank{R}.json.gz`,
open it in Perfetto or chrome://tracing) and a table of the operators that took the most device
and host time (`step{N}-rank{R}.txt`). The step's phases (rollout, reward, update, sync) appear as
named ranges. Other steps run without the profiler.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

TABLE_ROWS = 40


class StepProfiler:
    def __init__(self, steps: list[int], out_dir: Path, rank: int, device: torch.device):
        self.steps = set(steps)
        self.out_dir, self.rank, self.device = Path(out_dir), rank, device

    @contextlib.contextmanager
    def step(self, step: int):
        """Profile the block if `step` is one of the chosen steps; otherwise run it as it is."""
        if step not in self.steps:
            yield
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            yield
        self._write(prof, step)

    def _write(self, prof, step: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"step{step}-rank{self.rank}"
        prof.export_chrome_trace(f"{stem}.json.gz")  # torch gzips a path ending in .gz
        events = prof.key_averages()
        tables = []
        if self.device.type == "cuda":
            tables.append(("device time", events.table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS)))
        tables.append(("host time", events.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)))
        text = "\n\n".join(f"## step {step}, rank {self.rank}: top operators by self {what}\n{t}" for what, t in tables)
        Path(f"{stem}.txt").write_text(text + "\n")


def phase(name: str):
    """A named range in the trace of a profiled step (next to nothing otherwise)."""
    return record_function(name)
