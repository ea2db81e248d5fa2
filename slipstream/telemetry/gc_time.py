"""Wall time spent in Python's garbage collector while a block runs: a full collection over a
large heap stalls the rollout it happens in."""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager


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


@contextmanager
def frozen_startup_heap():
    """Collect, then keep every object alive now (imported modules, the model's Python objects,
    the dataset) out of the collector's reach until the block ends: they live for the whole run,
    and a full collection that walks them (0.20 s for the 423k objects of a SmolLM2 run's
    start-up on a 2-core CPU, benchmarks/gc_heap.py) stalls whichever step it lands in. Cycles
    made inside the block are still collected; at its end the frozen objects are handed back to
    the collector. Yields the number of objects frozen."""
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()
