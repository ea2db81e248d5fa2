"""Host time of the engine's scheduler: schedule() + postprocess() of decode steps, no model.

    python benchmarks/scheduler_host.py [--batch 256] [--steps 200] [--prompt 128]

A large batch of decoding sequences (their prompts prefilled first) runs `--steps` single decode
steps with sampled tokens from a fixed list, so only the scheduler, the block manager and the
sequences' bookkeeping are timed: the host work an engine step adds at large batches, where a
small model's GPU step is a few milliseconds. Prints microseconds per step and per sequence;
writes benchmarks/results/scheduler_host.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from slipstream.rollout.block_manager import BlockManager  # noqa: E402
from slipstream.rollout.scheduler import Scheduler  # noqa: E402
from slipstream.rollout.sequence import Sequence  # noqa: E402
from slipstream.rollout.types import Request, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commit", default=None, help="commit to record (default: $SLIPSTREAM_COMMIT, else git)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scheduler_host.json"))
    args = ap.parse_args()

    rng = random.Random(0)
    best = float("inf")
    for _ in range(args.repeats):
        bm = BlockManager(num_blocks=args.batch * (args.prompt + args.steps + 32) // 16 + 64, block_size=16)
        sch = Scheduler(bm, max_num_seqs=args.batch, max_num_batched_tokens=args.batch * args.prompt + 1)
        params = SamplingParams(temperature=1.0, max_tokens=10**6)
        for i in range(args.batch):
            prompt = [rng.randrange(1000) for _ in range(args.prompt)]
            sch.add(Sequence.from_request(Request(prompt, params, str(i), str(i))))
        batch = sch.schedule()  # every prompt prefilled in one step
        sch.postprocess(batch, [1] * len(batch.sampling))
        tokens = [rng.randrange(1000) for _ in range(args.batch)]
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch = sch.schedule()
            sch.postprocess(batch, tokens[:len(batch.sampling)], [0.0] * len(batch.sampling))
        best = min(best, (time.perf_counter() - t0) / args.steps)
        assert sch.num_running == args.batch and not sch.waiting
    print(f"batch {args.batch}: {best * 1e6:.0f} us per decode step, {best * 1e6 / args.batch:.2f} us per sequence "
          f"(best of {args.repeats}, {args.steps} steps each, Python {sys.version.split()[0]})")
    from benchmarks.longtail import commit_of

    meta = {"device": f"CPU: {platform.processor() or platform.machine()}", "python": sys.version.split()[0],
            "commit": commit_of(args.commit), "args": vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "us_per_decode_step": best * 1e6,
                                          "us_per_sequence": best * 1e6 / args.batch}, indent=2))


if __name__ == "__main__":
    main()
