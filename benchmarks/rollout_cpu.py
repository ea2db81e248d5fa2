"""Rollout throughput on CPU: the native engine vs batched HF `generate`, default-recipe shape.

    python benchmarks/rollout_cpu.py [--prompts 4] [--n 8] [--max-tokens 48] [--repeats 2]

SmolLM2-135M-Instruct (real weights, fp32), arithmetic prompts of the default recipe, sampled at
temperature 0.7 with the same seed for both backends; both run in the same process, alternating.
Writes benchmarks/results/rollout_cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/rollout_cpu.json")
    args = ap.parse_args()

    from slipstream.config import compose
    from slipstream.models import load_model_and_tokenizer
    from slipstream.rollout.types import Request, SamplingParams
    from slipstream.tasks import build_task
    from slipstream.trainer.rl_loop import build_rollout, encode_prompt

    cfg = compose(["recipe=default"])
    device = torch.device("cpu")
    model, tok = load_model_and_tokenizer(dataclasses.replace(cfg.model, dtype="float32"), device)
    problems = build_task(cfg.task).train_problems()[: args.prompts]
    params = SamplingParams(n=args.n, temperature=0.7, max_tokens=args.max_tokens, seed=0)
    requests = [Request(encode_prompt(tok, p, cfg.task.system_prompt), params, p.uid, p.uid) for p in problems]
    engines = {b: build_rollout(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, backend=b)),
                                model, tok, device) for b in ("hf", "native")}
    runs = {b: [] for b in engines}
    for _ in range(args.repeats):
        for backend, engine in engines.items():
            t0 = time.perf_counter()
            comps = engine.generate(requests)
            seconds = time.perf_counter() - t0
            tokens = sum(len(c.tokens) for c in comps)
            runs[backend].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
            print(f"{backend:7s} {seconds:6.1f} s  {tokens} tokens  {tokens / seconds:6.1f} tok/s", flush=True)
    best = {b: max(r["tokens_per_s"] for r in rs) for b, rs in runs.items()}
    print(f"native / hf: {best['native'] / best['hf']:.2f}x (best of {args.repeats})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "commit": commit or None, "prompts": args.prompts, "n": args.n,
            "max_tokens": args.max_tokens}
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs, "best_tokens_per_s": best}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
