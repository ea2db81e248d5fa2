"""This rank's GPU memory per step: peak allocated, reserved, and the caching allocator's work.

A step that allocates tensors of shapes the cache cannot serve calls cudaMalloc; when that
fails, the allocator frees every cached block (cudaFree synchronizes the device) and retries.
Either stalls the step that pays it, so their counts are logged beside the times.
"""

from __future__ import annotations

import torch

# torch.cuda.memory_stats counter -> metric (the step's increase)
COUNTERS = {"num_alloc_retries": "memory/alloc_retries", "num_device_alloc": "memory/cuda_mallocs",
            "num_device_free": "memory/cuda_frees", "num_ooms": "memory/ooms"}


def memory_step_metrics(before: dict, now: dict) -> dict[str, float]:
    """The step's metrics from two `torch.cuda.memory_stats` snapshots (peak since the last reset)."""
    out = {name: float(now.get(key, 0) - before.get(key, 0)) for key, name in COUNTERS.items()}
    out["memory/peak_allocated_gb"] = now.get("allocated_bytes.all.peak", 0) / 2**30
    out["memory/reserved_gb"] = now.get("reserved_bytes.all.current", 0) / 2**30
    return out


class CudaMemoryMeter:
    """`step()` returns the metrics since the previous call (nothing off CUDA) and resets the peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        self._last = self._snapshot()

    def _snapshot(self) -> dict:
        return torch.cuda.memory_stats(self.device) if self.enabled else {}

    def step(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        now = self._snapshot()
        out = memory_step_metrics(self._last, now)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._last = now
        return out
