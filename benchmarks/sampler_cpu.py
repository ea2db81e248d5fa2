"""The torch sampler's cost per decode step: inverse CDF against the exponential race it replaced.

    python benchmarks/sampler_cpu.py [--rows 1 8 32 64] [--vocab 49152] [--device cpu] [--commit SHA]

Per batch size (rows of logits over SmolLM2's 49,152-token vocabulary, temperature 0.7, no top-k
or top-p): the time of `slipstream.rollout.sampler.sample` (one uniform per row against a float64
running sum), of the race it replaced in the same run (an exponential per vocabulary entry,
argmax p_i / E_i), and the floor, one read of the logits at the copy bandwidth measured here.
This sampler is the CPU's (the default recipe's rollouts and evaluations) and the GPU's for rows
with top-k or top-p; other GPU rows use the fused kernel. Writes benchmarks/results/sampler_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.longtail import sync, write_json  # noqa: E402
from slipstream.rollout.sampler import sample, shape_logits  # noqa: E402


def race_sample(logits, temperature, generator):
    """The baseline: the exponential race over the whole vocabulary."""
    shaped = shape_logits(logits, temperature, None, None, truncate=False)
    logprobs = shaped.log_softmax(-1)
    noise = torch.empty_like(logprobs).exponential_(generator=generator)
    drawn = (logprobs - noise.log()).argmax(-1)
    tokens = torch.where(temperature > 0, drawn, shaped.argmax(-1))
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def best_seconds(fn, device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampler_cpu.json"))
    args = ap.parse_args(argv)
    if min(args.rows) < 1 or args.vocab < 2 or args.repeats < 1:
        ap.error("--rows and --repeats must be >= 1 and --vocab >= 2")
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(0)
    big = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    copy_s = best_seconds(lambda: big.clone(), device, 5)
    bandwidth = 2 * big.numel() / copy_s  # bytes read and written per second
    rows = []
    for n in args.rows:
        logits = torch.randn(n, args.vocab, generator=gen, device=device) * 3
        temperature = torch.full((n,), 0.7, device=device)
        new = best_seconds(lambda: sample(logits, temperature, None, None, gen, truncate=False), device, args.repeats)
        race = best_seconds(lambda: race_sample(logits, temperature, gen), device, args.repeats)
        floor = logits.numel() * logits.element_size() / bandwidth
        rows.append({"rows": n, "inverse_cdf_ms": new * 1e3, "race_ms": race * 1e3, "floor_ms": floor * 1e3,
                     "speedup": race / new, "over_floor": new / floor})
        print(f"{n:4d} rows: inverse CDF {new * 1e3:7.2f} ms  race {race * 1e3:7.2f} ms  ({race / new:4.1f}x)  "
              f"floor {floor * 1e3:6.3f} ms ({new / floor:5.1f}x of it)", flush=True)
    write_json(args.out, "sampler_cpu", args, device, copy_bandwidth_gb_s=bandwidth / 1e9, rows=rows)


if __name__ == "__main__":
    main()
