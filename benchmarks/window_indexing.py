"""What moving a rollout's outputs into the suffix drafter's windows costs the trainer's update.

The update of a small model is bound by the host's kernel launches, which need the interpreter.
Work done in a Python thread while it runs takes the interpreter from it. This compares, at the
SmolLM2 GPU recipe's scale (16 prompts x 8 samples per step, answers of about 70 tokens, windows
of 4 steps, at their steady state), per RL step:

* `thread`: the outputs recorded and indexed in a thread while a host-bound stand-in for the
  update runs (many small torch ops on one thread; how slots used to end a rollout);
* `deferred`: the outputs recorded at the rollout's end (lengths noted, tokens queued), the
  update run alone, then the queued indexing done in units (`SuffixDrafter.index_some`), as the
  engine does in the next rollout's waits for the GPU.

    python benchmarks/window_indexing.py [--steps 8] [--ops 20000] --commit SHA

Prints, per step, the update alone and beside the thread, the recording time, the deferred
indexing and its longest unit; then the medians of the differences within a step (the host's
speed drifts between steps). Runs on the CPU; writes benchmarks/results/window_indexing_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from slipstream.rollout.spec.suffix_tree import SuffixConfig, SuffixDrafter  # noqa: E402


def rollout(rng: random.Random, prompts: int, samples: int, mean_len: int) -> list[tuple[str, list[int]]]:
    return [(f"p{g}", [rng.randrange(49152) for _ in range(max(4, int(rng.expovariate(1 / mean_len))))])
            for g in range(prompts) for _ in range(samples)]


def update_stand_in(ops: int) -> float:
    """Seconds for `ops` small torch ops in a row: host-bound, as a small model's update is."""
    x = torch.randn(64, 64)
    t0 = time.perf_counter()
    for _ in range(ops):
        x = (x * 1.0001).add_(0.0)
    return time.perf_counter() - t0


def record(d: SuffixDrafter, outputs) -> None:
    for gid, tokens in outputs:
        d.add_rollout(gid, tokens)
    d.end_step()


def index_all(d: SuffixDrafter) -> tuple[float, float, int]:
    """The deferred indexing in units: total seconds, longest unit, units."""
    total = longest = 0.0
    units = 0
    while True:
        t0 = time.perf_counter()
        if not d.index_some():
            return total, longest, units
        dt = time.perf_counter() - t0
        total, longest, units = total + dt, max(longest, dt), units + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="measured RL steps (after the windows fill)")
    ap.add_argument("--ops", type=int, default=8000, help="torch ops in the update's stand-in")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--mean-len", type=int, default=70)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "window_indexing_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    cfg = SuffixConfig(window_steps=4)
    threaded, deferred = SuffixDrafter(cfg), SuffixDrafter(cfg)
    for _ in range(cfg.window_steps):  # the windows at their steady state
        outputs = rollout(rng, args.prompts, args.samples, args.mean_len)
        for d in (threaded, deferred):
            record(d, outputs)
            index_all(d)
    rows = []
    for step in range(args.steps):
        outputs = rollout(rng, args.prompts, args.samples, args.mean_len)
        row = {"tokens": sum(len(t) for _, t in outputs)}
        kinds = ["alone", "thread", "deferred"]
        for kind in kinds[step % 3:] + kinds[:step % 3]:  # a rotated order: the host's drift spreads
            if kind == "alone":
                row["update_alone_s"] = update_stand_in(args.ops)
            elif kind == "thread":
                worker = threading.Thread(target=lambda: (record(threaded, outputs), index_all(threaded)))
                worker.start()
                row["update_beside_thread_s"] = update_stand_in(args.ops)
                worker.join()
            else:
                t0 = time.perf_counter()
                record(deferred, outputs)
                row["record_s"] = time.perf_counter() - t0
                row["update_after_deferred_record_s"] = update_stand_in(args.ops)
                row["deferred_indexing_s"], row["longest_unit_s"], row["units"] = index_all(deferred)
        rows.append(row)
        print(f"step {step}: update alone {1e3 * row['update_alone_s']:.0f} ms, beside the thread "
              f"{1e3 * row['update_beside_thread_s']:.0f} ms; deferred: record {1e3 * row['record_s']:.1f} ms, "
              f"update {1e3 * row['update_after_deferred_record_s']:.0f} ms, indexing "
              f"{1e3 * row['deferred_indexing_s']:.1f} ms in {row['units']} units (longest "
              f"{1e3 * row['longest_unit_s']:.2f} ms)")
    assert deferred.state_dict() == threaded.state_dict(), "the two ways gave different windows"
    for r in rows:  # paired within a step: the host's speed drifts between steps
        r["thread_adds_s"] = r["update_beside_thread_s"] - r["update_alone_s"]
        r["deferred_adds_s"] = r["update_after_deferred_record_s"] - r["update_alone_s"]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nmedians per step: update alone {1e3 * med['update_alone_s']:.0f} ms; the thread adds "
          f"{1e3 * med['thread_adds_s']:.1f} ms to it, the deferred recording {1e3 * med['deferred_adds_s']:.1f} ms "
          f"(differences within a step); recording takes {1e3 * med['record_s']:.1f} ms "
          f"and {1e3 * med['deferred_indexing_s']:.1f} ms of indexing "
          f"(units up to {1e3 * med['longest_unit_s']:.2f} ms) "
          f"move to the next rollout's waits for the GPU")
    out = {"meta": {"commit": args.commit, "python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "args": vars(args)},
           "median": med, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
