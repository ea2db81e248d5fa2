"""Per-kernel GPU time of decode steps, and how much of a step's wall time the GPU is busy.

    python benchmarks/decode_profile.py [--model qwen2.5-0.5b] [--batch 1] [--context 384] [--cuda-graphs]
                                        [--out benchmarks/results/decode_profile.json]

Builds a random-weight model of the shape, prefills `batch` prompts, then runs 20 engine steps
under torch.profiler and prints the kernels by total GPU time, then per decoded token: the wall
time, the summed kernel time and their ratio (GPU busy). With `--cuda-graphs` the steps replay
CUDA graphs as the engine does by default (`decode_steps` tokens per replay); without, they run
eagerly, which shows each kernel by name but adds the host's launch time to the wall time.
With `--cuda-graphs` it then times, without the profiler, engine steps against bare replays of
the same graph (the GPU's time alone): the difference is the host's share of a decode step.
`--out` writes the per-token figures as JSON (device, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.engine_decode import QWEN_SHAPES, hf_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(QWEN_SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--rows", type=int, default=25, help="kernels to list")
    ap.add_argument("--out", default=None, help="write the per-token figures to this JSON file")
    args = ap.parse_args()

    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.sequence import Sequence
    from slipstream.rollout.types import Request, SamplingParams

    device = torch.device("cuda")
    decoder = decoder_from_hf_module(hf_model(args.model, None, device), dtype=torch.bfloat16, device=device)
    engine = Engine(decoder, [], EngineConfig(kv_cache_gb=4.0, max_model_len=args.context + 2048,
                                              cuda_graphs=args.cuda_graphs))
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        prompt = torch.randint(10, 1000, (args.context,), generator=g).tolist()
        engine.scheduler.add(Sequence.from_request(
            Request(prompt, SamplingParams(temperature=1.0, max_tokens=10_000), str(i), str(i))))
    for _ in range(5):  # prefill, graph capture and warm-up decodes
        engine.step()
    torch.cuda.synchronize()

    def decoded() -> int:
        return sum(len(s.output_ids) for s in engine.scheduler.running)

    start_tokens = decoded()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    steps = (decoded() - start_tokens) // args.batch
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    kernel_us = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{args.model} batch {args.batch} cuda_graphs={args.cuda_graphs}: {steps} tokens per sequence; "
          f"per token: wall {wall / steps * 1e6:.1f} us, kernels {kernel_us / steps:.1f} us "
          f"({launches / steps:.0f} launches), GPU busy {kernel_us * 1e-6 / wall:.0%}")
    row = {"model": args.model, "batch": args.batch, "context": args.context, "cuda_graphs": args.cuda_graphs,
           "profiled_wall_us_per_token": wall / steps * 1e6, "kernel_us_per_token": kernel_us / steps,
           "launches_per_token": launches / steps}
    if args.cuda_graphs:
        row.update(host_share(engine, args.batch))
    if args.out:
        import triton

        from benchmarks.longtail import commit_of

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "commit": commit_of(None)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": [row]}, indent=2))


def host_share(engine, batch: int, reps: int = 50) -> dict:
    """Per token: engine steps (host work + replay) vs replays of the same graph back to back."""
    graphs = engine.runner.graphs
    seqs = list(engine.scheduler.running)
    start = sum(len(s.output_ids) for s in seqs)
    t0 = time.perf_counter()
    for _ in range(reps):
        engine.step()
    torch.cuda.synchronize()
    step_wall = time.perf_counter() - t0
    tokens = (sum(len(s.output_ids) for s in seqs) - start) // batch
    key = (graphs.last_bucket, engine.cfg.decode_steps)
    graph = graphs.graphs[key][0]
    graph.replay()  # the same inputs again: the same K/V slots rewritten, the same kernels
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    replay_wall = time.perf_counter() - t0
    per_step, per_replay = step_wall / tokens * 1e6, replay_wall / (reps * key[1]) * 1e6
    print(f"per token: engine step {per_step:.1f} us, bare replay {per_replay:.1f} us: "
          f"host share {1 - per_replay / per_step:.0%}")
    return {"engine_step_us_per_token": per_step, "bare_replay_us_per_token": per_replay}


if __name__ == "__main__":
    main()
