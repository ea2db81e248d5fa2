"""What Python's garbage collector has to walk in an RL run, and how long a full collection takes.

Two heaps: the trainer's start-up heap (torch, transformers, hydra and deepspeed imported, the
SmolLM2-135M model and tokenizer loaded: what `frozen_startup_heap` keeps out of the collector's
reach while it trains), and the suffix trees of speculation (tracked objects per indexed token,
at the scale of the SmolLM2 recipe's windows and at the per-prompt window cap):

    python benchmarks/gc_heap.py --model /tmp/smollm2-hf --commit SHA

Runs on the CPU (the collector's cost is host time); writes benchmarks/results/gc_heap.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def full_collection_s(repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t0)
    return best


def startup_heap(model: str) -> dict:
    import hydra  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from slipstream.config import ModelConfig
    from slipstream.models import load_model_and_tokenizer
    from slipstream.trainer import rl_loop  # noqa: F401

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    loaded = load_model_and_tokenizer(ModelConfig(name=model, dtype="float32"), torch.device("cpu"))
    gc.collect()
    row = {"tracked_objects": len(gc.get_objects()), "full_collection_s": full_collection_s()}
    gc.freeze()
    row["full_collection_frozen_s"] = full_collection_s()
    gc.unfreeze()
    del loaded
    return row


def suffix_trees(prompts: int, rollouts: int, length, vocab: int, seed: int = 0) -> dict:
    from slipstream.rollout.spec.suffix_tree import SuffixTree

    rng = random.Random(seed)
    gc.collect()
    gc.freeze()  # count and time the trees alone
    try:
        trees, tokens = [], 0
        for _ in range(prompts):
            tree = SuffixTree()
            for _ in range(rollouts):
                n = length(rng)
                tree.add([rng.randrange(vocab) for _ in range(n)])
                tokens += n
            trees.append(tree)
        objects = len(gc.get_objects())
        return {"prompts": prompts, "rollouts_per_prompt": rollouts, "tokens": tokens, "tracked_objects": objects,
                "objects_per_token": objects / tokens, "full_collection_s": full_collection_s()}
    finally:
        gc.unfreeze()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/smollm2-hf", help="local HF directory of SmolLM2-135M-Instruct")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gc_heap.json"))
    args = p.parse_args(argv)
    # the recipe's scale: 256 windows (max_prompts) of 4 steps x 8 answers of about 45 tokens
    recipe = suffix_trees(256, 32, lambda r: min(256, int(r.expovariate(1 / 45)) + 5), 200)
    # the window cap: 16 prompts holding 32,768 tokens each (max_tokens_per_prompt)
    capped = suffix_trees(16, 8, lambda r: 4096, 2000)
    start = startup_heap(args.model)
    import torch

    out = {"meta": {"commit": args.commit, "python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine()},
           "startup_heap": start, "suffix_trees_recipe_scale": recipe, "suffix_trees_window_cap": capped}
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
