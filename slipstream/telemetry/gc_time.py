"""Wall time spent in Python's garbage collector while a block runs: a full collection over a
large heap stalls the rollout it happens in."""

from __future__ import annotations

import gc
import time


class GCTime:
    def __init__(self):
        self.seconds = 0.0
        self.collections = 0
        self._t0: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.collections += 1
            self._t0 = None

    def __enter__(self) -> GCTime:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
