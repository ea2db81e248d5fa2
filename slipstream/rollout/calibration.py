"""Finding the skip-softmax (BLASST) threshold scale that reaches a target sparsity.

The measured fraction of skipped key tiles grows with the scale (lambda = scale / context
length), so a bisection in log-space over the scale finds, for one phase, the smallest scale
whose sparsity on sample rollouts reaches the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from slipstream.rollout.engine import Engine
from slipstream.rollout.types import Request


@dataclass
class Calibration:
    phase: str
    target: float
    scale: float
    sparsity: float  # measured at `scale`
    trials: list[tuple[float, float]]  # (scale, sparsity) of every probe, in order


def measure_sparsity(make_engine: Callable[[float], Engine], requests: list[Request], phase: str,
                     scale: float) -> float:
    engine = make_engine(scale)
    engine.generate(requests)
    return engine.sparsity().get(phase, 0.0)


def calibrate_skip_scale(make_engine: Callable[[float], Engine], requests: list[Request], phase: str,
                         target: float, lo: float = 1e-4, hi: float = 1e6, iters: int = 12,
                         progress: Callable[[float, float], None] | None = None) -> Calibration:
    """`make_engine(scale)` builds an engine that applies `scale` in `phase` ("prefill" or "decode")."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {target}")
    trials = []

    def probe(scale: float) -> float:
        s = measure_sparsity(make_engine, requests, phase, scale)
        trials.append((scale, s))
        if progress is not None:
            progress(scale, s)
        return s

    if probe(hi) < target:  # the workload cannot reach the target (e.g. contexts of one tile)
        return Calibration(phase, target, hi, trials[-1][1], trials)
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if probe(mid) >= target:
            hi = mid
        else:
            lo = mid
    reached = [t for t in trials if t[0] == hi]
    return Calibration(phase, target, hi, reached[-1][1], trials)
