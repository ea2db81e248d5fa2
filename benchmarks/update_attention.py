"""The trainer's forward + backward per micro-batch: which SDPA backend, and how micro-batch shapes recur.

    python benchmarks/update_attention.py --model /tmp/smollm2-hf [--batch 64] [--iters 10]
    (a dry run anywhere: --device cpu --batch 2 --max-tokens 16 --prompt 8 --iters 3)

The actor's update runs the HF model on [rows, prompt + response] micro-batches with a padding
mask, which rules out flash attention on CUDA; torch's SDPA then picks among the others by shape.
Each row is one set of enabled SDPA backends (`default`: all, torch's choice; `trainer`: the
actor's `TRAIN_SDPA_BACKENDS`; `cudnn`, `efficient`, `math` alone) x one shape regime:

  fixed     every micro-batch [batch, P + 256] (the width of the whole batch every time)
  varying   a new response width each micro-batch (length-grouped micro-batches cut to their
            longest row: about as many new shapes as micro-batches)
  bucketed  the varying widths rounded up so that prompt + response is a multiple of 64

It prints the median wall time of one forward + backward (synchronised; the first micro-batch
of a row is left out), the slowest one, the model FLOPs over the median time (the matmuls: 6 x
parameters x tokens, the LM head only over response positions) and whether every gradient was
finite; every micro-batch's time is in benchmarks/results/update_attention.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from slipstream.rollout.types import Completion  # noqa: E402
from slipstream.trainer import actor  # noqa: E402
from slipstream.trainer.actor import TRAIN_SDPA_BACKENDS, response_logprobs  # noqa: E402
from slipstream.trainer.batch import build_batch  # noqa: E402

BACKENDS = {
    "default": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH],  # every backend: torch's own choice
    "trainer": TRAIN_SDPA_BACKENDS,  # what the actor and critic run under
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
ALIGN = 64


def micro_batch(rng: random.Random, batch: int, prompt: int, width: int, vocab: int):
    """`batch` rows of left-padded prompts of up to `prompt` tokens and responses of up to
    `width` tokens, the longest exactly `width`."""
    comps = []
    for i in range(batch):
        p = rng.randint(prompt // 2, prompt) if i else prompt
        r = width if i == 0 else rng.randint(1, width)
        comps.append(Completion(f"r{i}", f"g{i // 8}", [rng.randrange(vocab) for _ in range(p)],
                                [rng.randrange(vocab) for _ in range(r)], [-1.0] * r, "stop"))
    return build_batch(comps, [0.0] * batch, pad_id=0)


def widths(regime: str, iters: int, prompt: int, cap: int, rng: random.Random) -> list[int]:
    if regime == "fixed":
        return [cap] * iters
    seen, out = set(), []
    while len(out) < iters:  # distinct widths: every micro-batch a shape not seen before
        w = rng.randint(cap // 2, cap)
        if w not in seen:
            seen.add(w)
            out.append(w)
    if regime == "bucketed":
        out = [min(cap, -(-(prompt + w) // ALIGN) * ALIGN - prompt) for w in out]
    return out


def run(model, device, backend: str, regime: str, args) -> dict:
    rng = random.Random(0)
    vocab = model.config.vocab_size
    batches = [micro_batch(rng, args.batch, args.prompt, w, vocab)
               for w in widths(regime, args.iters, args.prompt, args.max_tokens, rng)]
    walls, finite = [], []
    # the actor's forward enables these SDPA backends (torch keeps its own order among them)
    actor.TRAIN_SDPA_BACKENDS = BACKENDS[backend]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for b in batches:
        sync()
        t0 = time.perf_counter()
        lp = response_logprobs(model, b, device)
        lp.sum().backward()
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)
        finite.append(all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None))
        model.zero_grad(set_to_none=True)
    # the first micro-batch also pays one-time costs (kernel selection) in every regime
    wall = statistics.median(walls[1:])
    head = model.config.vocab_size * model.config.hidden_size
    body = sum(p.numel() for p in model.parameters()) - head * (1 if model.config.tie_word_embeddings else 2)
    flops = statistics.median(6 * (body * b.input_ids.numel() + head * b.size * (b.response_width + 1))
                              for b in batches[1:])
    return {"backend": backend, "regime": regime, "wall_ms": wall, "max_ms": max(walls[1:]),
            "tflops": flops / wall / 1e9,
            "finite_gradients": all(finite),
            "shapes": sorted({tuple(b.input_ids.shape) for b in batches}), "wall_ms_each": walls}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--batch", type=int, default=64, help="rows per micro-batch (the GPU recipe's micro_batch_size)")
    ap.add_argument("--prompt", type=int, default=48, help="prompt width")
    ap.add_argument("--max-tokens", type=int, default=256, help="the rollout's max_tokens")
    ap.add_argument("--iters", type=int, default=10, help="micro-batches per row (the first is not counted)")
    ap.add_argument("--backends", default="default,trainer,cudnn,efficient", help=",".join(BACKENDS))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of the script (its timings say nothing about the GPU path)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "update_attention.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("update_attention.py measures the CUDA update path; no CUDA device is visible "
                         "(--device cpu for a dry run)")
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.train()
    rows = []
    for backend in args.backends.split(","):
        for regime in ("fixed", "varying", "bucketed"):
            r = run(model, device, backend, regime, args)
            rows.append(r)
            print(f"{backend:>9} {regime:>8}: median {r['wall_ms']:7.1f} ms  slowest {r['max_ms']:7.1f} ms  "
                  f"{r['tflops']:5.1f} TFLOP/s  ({len(r['shapes'])} shapes)"
                  f"{'' if r['finite_gradients'] else '  NON-FINITE GRADIENTS'}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "commit": args.commit,
            "batch": args.batch, "prompt": args.prompt, "max_tokens": args.max_tokens, "iters": args.iters}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
