"""Host time of suffix drafting on the decode path: index one new token per live request, then
propose a draft for each, as the engine's speculative steps do.

    python benchmarks/suffix_drafting.py [--live 48] [--groups 8] [--steps 300]

`--groups` prompts, each with a window of 4 earlier rollouts of 1,000 tokens; `--live`
requests spread over them decode `--steps` tokens each (text with recurring phrases, so that
matches and drafts happen). Prints microseconds per request-step (update + propose) for several
`live_max_depth` settings in the same run; `max_depth` (the windows') stays 64. Writes
benchmarks/results/suffix_drafting.json.
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

from slipstream.rollout.spec.suffix_tree import SuffixConfig, SuffixDrafter  # noqa: E402


def _text(rng: random.Random, phrases: list[list[int]], n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out += rng.choice(phrases) if rng.random() < 0.6 else [rng.randrange(49152)]
    return out[:n]


def run(live_max_depth: int, args) -> tuple[float, float, float]:
    rng = random.Random(0)
    phrases = [[rng.randrange(49152) for _ in range(rng.randrange(3, 12))] for _ in range(60)]
    d = SuffixDrafter(SuffixConfig(max_depth=64, live_max_depth=live_max_depth, cap=15))
    for step in range(4):
        for g in range(args.groups):
            d.add_rollout(g, _text(rng, phrases, 1000), step=step)
    d.start_step(4)
    d.catch_up()  # the windows indexed before the timed steps, as the engine's waits do
    prompts = {g: [rng.randrange(49152) for _ in range(100)] for g in range(args.groups)}
    outputs = {r: _text(rng, phrases, args.steps) for r in range(args.live)}
    for r in range(args.live):
        d.add_request(r, r % args.groups, prompts[r % args.groups])
    ctxs = {r: (prompts[r % args.groups] + outputs[r])[:] for r in range(args.live)}
    drafted = 0
    index = propose = 0.0
    for t in range(args.steps):
        t0 = time.perf_counter()
        for r in range(args.live):
            d.update(r, [outputs[r][t]])
        t1 = time.perf_counter()
        end = len(prompts[0]) + t + 1
        for r in range(args.live):  # the engine passes the last max_depth tokens
            drafted += len(d.propose(r, r % args.groups, ctxs[r][max(end - 64, 0):end], 8).tokens)
        index += t1 - t0
        propose += time.perf_counter() - t1
    n = args.steps * args.live
    return index / n, propose / n, drafted / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=int, default=48)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--commit", default=None, help="commit to record (default: $SLIPSTREAM_COMMIT, else git)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suffix_drafting.json"))
    args = ap.parse_args()
    rows = []
    for depth in (64, 24, 16):
        index, propose, drafted = run(depth, args)
        print(f"live_max_depth {depth:2d}: index {index * 1e6:5.1f} + propose {propose * 1e6:5.1f} us per request-step "
              f"({(index + propose) * args.live * 1e3:4.2f} ms per step of {args.live}), "
              f"{drafted:.2f} draft tokens per request-step", flush=True)
        rows.append({"live_max_depth": depth, "index_us": index * 1e6, "propose_us": propose * 1e6,
                     "draft_tokens_per_request_step": drafted})
    from benchmarks.longtail import commit_of

    meta = {"device": f"CPU: {platform.processor() or platform.machine()}", "python": sys.version.split()[0],
            "commit": commit_of(args.commit), "args": vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
