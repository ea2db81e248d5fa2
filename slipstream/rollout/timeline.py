"""What every engine step of a rollout did and how long it took: the live batch as it drains,
speculation on or off, drafted/accepted tokens. The metrics of a rollout and its timeline plot
come from here."""

from __future__ import annotations

import bisect
import time
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class StepRecord:
    start: float  # seconds since the rollout began
    seconds: float  # wall clock of the whole step (drafting, schedule, forward, verification, postprocess)
    live: int  # unfinished sequences (running + waiting) when the step was planned
    emitted: int  # tokens appended to sequences
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of which accepted
    verified_seqs: int = 0  # sequences that verified a draft

    @property
    def speculative(self) -> bool:
        return self.drafted > 0


class Timeline:
    """Step records of the current (or last) rollout; `begin` starts a new one."""

    def __init__(self):
        self.steps: list[StepRecord] = []
        self._t0 = time.perf_counter()

    def begin(self) -> None:
        self.steps = []
        self._t0 = time.perf_counter()

    def record(self, t_start: float, t_end: float, live: int, emitted: int, drafted: int = 0,
               accepted: int = 0, verified_seqs: int = 0) -> None:
        self.steps.append(StepRecord(t_start - self._t0, t_end - t_start, live, emitted, drafted, accepted,
                                     verified_seqs))

    def to_columns(self) -> dict[str, list]:
        """The steps as columns (compact in a JSON line): start and seconds rounded to 0.1 ms."""
        cols: dict[str, list] = {f.name: [] for f in fields(StepRecord)}
        for s in self.steps:
            for name, value in asdict(s).items():
                cols[name].append(round(value, 4) if isinstance(value, float) else value)
        return cols

    def metrics(self, bucket_edges: tuple[int, ...], small_batch: int = 16) -> dict[str, float]:
        """Per rollout: time and steps with and without speculation, drafted and accepted tokens,
        the mean acceptance length (tokens emitted per sequence and verification: accepted + 1)
        overall and per live-batch bucket (keyed by the bucket's lower edge), and the time spent
        with fewer than `small_batch` live sequences."""
        spec = [s for s in self.steps if s.speculative]
        plain = [s for s in self.steps if not s.speculative]
        drafted = sum(s.drafted for s in spec)
        accepted = sum(s.accepted for s in spec)
        verified = sum(s.verified_seqs for s in spec)
        out = {
            "spec/steps_spec": float(len(spec)),
            "spec/steps_plain": float(len(plain)),
            "spec/time_spec_steps": sum(s.seconds for s in spec),
            "spec/time_plain_steps": sum(s.seconds for s in plain),
            "spec/drafted_tokens": float(drafted),
            "spec/accepted_tokens": float(accepted),
            f"rollout/time_below_batch_{small_batch}": sum(s.seconds for s in self.steps if s.live < small_batch),
            # one slow step in a fast rollout is a one-time cost (a graph captured, a kernel compiled)
            "rollout/slowest_step_s": max((s.seconds for s in self.steps), default=0.0),
        }
        if drafted:
            out["spec/acceptance_rate"] = accepted / drafted
            out["spec/accept_len"] = (accepted + verified) / verified
        per_bucket: dict[int, list[int]] = {}
        for s in spec:
            edge = bucket_edges[max(bisect.bisect_right(bucket_edges, s.live) - 1, 0)]
            acc = per_bucket.setdefault(edge, [0, 0])
            acc[0] += s.accepted + s.verified_seqs
            acc[1] += s.verified_seqs
        for edge, (tokens, seqs) in sorted(per_bucket.items()):
            out[f"spec/accept_len/bs{edge}"] = tokens / seqs
        return out
