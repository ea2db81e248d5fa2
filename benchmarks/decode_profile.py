"""Per-kernel GPU time of eager decode steps (what a CUDA-graph replay is made of).

    python benchmarks/decode_profile.py [--model qwen2.5-0.5b] [--batch 1] [--context 384]

Builds a random-weight model of the shape, prefills `batch` prompts, then runs 20 decode steps
with CUDA graphs off under torch.profiler and prints the kernels by total GPU time.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.engine_decode import QWEN_SHAPES, hf_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(QWEN_SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=384)
    args = ap.parse_args()

    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    device = torch.device("cuda")
    decoder = decoder_from_hf_module(hf_model(args.model, None, device), dtype=torch.bfloat16, device=device)
    engine = Engine(decoder, [], EngineConfig(kv_cache_gb=4.0, max_model_len=args.context + 64, cuda_graphs=False))
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        prompt = torch.randint(10, 1000, (args.context,), generator=g).tolist()
        engine.scheduler.add(__import__("slipstream.rollout.sequence", fromlist=["Sequence"]).Sequence.from_request(
            Request(prompt, SamplingParams(temperature=1.0, max_tokens=10_000), str(i), str(i))))
    for _ in range(5):  # prefill and warm-up decodes
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
