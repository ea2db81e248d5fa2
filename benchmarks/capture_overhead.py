"""What capturing hidden states for the learned drafter costs a decoding engine (GPU).

    python benchmarks/capture_overhead.py [--batches 16 64] [--new-tokens 256] [--out FILE]

A random-weight model of SmolLM2-135M's shape (throughput depends on shapes, not values) decodes
`--new-tokens` tokens for each of `batch` prompts (EOS ignored, greedy) in four engines:

* `off`: no capture (the `spec=off` engine);
* `off+kernel`: no capture, but one unrelated one-element kernel launched after every decode
  replay, as the capture's hand-over launches its copies: it isolates what any kernel between
  the chained replays costs;
* `capture`: the last layer's hidden states captured and handed to a sink that drops them (the
  graphs' extra output and the engine's hand-over alone);
* `windows+buffer`: handed to the drafter's context windows and feature buffer, as the
  learned-drafter engines do.

Prints tokens/s per engine and batch and the ratio to `off` measured in the same run, and per
decode step: the host's time in the hand-over (`emit_step_features`, the rows' indexing after
the next launch and `flush_features`, the sink included) and the GPU's time inside the decode
replays (CUDA events around each graph replay), apart from the GPU's work between replays.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.engine_decode import kv_cache_gb  # noqa: E402


VARIANTS = ("off", "off+kernel", "capture", "windows+buffer")


def smollm2_shaped(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def sinks(variant: str, decoder, device):
    """(capture_layers, feature_sink) of an engine variant."""
    if variant in ("off", "off+kernel"):
        return (), None
    if variant == "capture":
        return (-1,), lambda features: None
    from slipstream.drafter.config import DrafterConfig
    from slipstream.drafter.context import ContextWindows
    from slipstream.drafter.feature_buffer import FeatureBuffer

    cfg, dtype, hidden = DrafterConfig(), decoder.embed.weight.dtype, decoder.config.hidden_size
    windows = ContextWindows(cfg.window, hidden, cfg.capture_layer, dtype=dtype, device=device)
    buffer = FeatureBuffer(cfg, hidden, dtype, device)

    def sink(features):
        windows(features)
        buffer(features)
    return (-1,), sink


def greedy_engine(decoder, prompts: torch.Tensor, new_tokens: int, capture_layers, feature_sink, decode_steps: int = 4):
    """An engine sized for `prompts` [batch, length] and `new_tokens` each, and their greedy requests."""
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    batch, plen = prompts.shape
    max_len = plen + new_tokens + 16
    cfg = EngineConfig(block_size=16, kv_cache_gb=kv_cache_gb(decoder, batch * max_len), max_num_seqs=batch,
                       max_num_batched_tokens=max(8192, batch * plen), max_model_len=max_len,
                       decode_steps=decode_steps)
    engine = Engine(decoder, eos_token_ids=[], cfg=cfg, capture_layers=capture_layers, feature_sink=feature_sink)
    reqs = [Request(p.tolist(), SamplingParams(temperature=0.0, max_tokens=new_tokens), str(i), str(i))
            for i, p in enumerate(prompts)]
    return engine, reqs


def time_variant(variant: str, decoder, prompts: torch.Tensor, new_tokens: int, repeats: int
                 ) -> tuple[list[float], float, float]:
    """Wall seconds of each run, and per decode step (over the runs): the host's microseconds in
    the hand-over of features (queueing a replay's rows and handing them to the sink), the GPU's
    microseconds inside the decode graph replays."""
    engine, reqs = greedy_engine(decoder, prompts, new_tokens, *sinks(variant, decoder, prompts.device))
    engine.capture_graphs()
    engine.generate(reqs)  # warm-up: kernels compiled, every bucket's graph replayed once
    runner, graphs = engine.runner, engine.runner.graphs
    replay_steps, launch = graphs.replay_steps, runner.launch_decode_steps
    handover, replays, depth = [0.0], [], [0]

    def timed(fn):  # the outermost call only (flush_features indexes the queued rows itself)
        def call(*a, **kw):
            t = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    handover[0] += time.perf_counter() - t
        return call

    def timed_replay(*a, **kw):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay_steps(*a, **kw)
        end.record()
        replays.append((start, end))
        return out

    scratch = torch.zeros(1, device=prompts.device)

    def launch_and_kernel(*a, **kw):
        launched = launch(*a, **kw)
        scratch.add_(1)
        return launched

    runner.emit_step_features, runner.flush_features = timed(runner.emit_step_features), timed(runner.flush_features)
    runner._index_queued_steps = timed(runner._index_queued_steps)
    graphs.replay_steps = timed_replay
    if variant == "off+kernel":
        runner.launch_decode_steps = launch_and_kernel
    times, gpu_ms = [], 0.0
    for _ in range(repeats):
        engine.block_manager.reset_prefix_cache()
        replays.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(reqs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        gpu_ms += sum(a.elapsed_time(b) for a, b in replays)
    steps = repeats * new_tokens
    return times, handover[0] / steps * 1e6, gpu_ms / steps * 1e3


def check_features(decoder, prompts: torch.Tensor, new_tokens: int) -> dict:
    """The features several-step replays hand over (through the graphs' feature ring) against
    those of single decode steps (handed over as each step runs), same greedy generation: the same
    (sequence, position) rows, the same fed tokens, and how far the hidden states differ."""
    seen = []
    for steps in (4, 1):
        rows: dict = {}

        def sink(f, rows=rows):
            keys = [f.seq_keys[int(o)] for o in f.owner.tolist()]
            for r, (key, pos, tok) in enumerate(zip(keys, f.positions.tolist(), f.token_ids.tolist())):
                rows[key, pos] = (tok, f.hidden[-1][r])

        engine, reqs = greedy_engine(decoder, prompts, new_tokens, (-1,), sink, decode_steps=steps)
        engine.generate(reqs)
        seen.append(rows)
    multi, single = seen
    same_tokens = all(multi[k][0] == single[k][0] for k in single if k in multi)
    diff = max((multi[k][1].float() - single[k][1].float()).abs().max().item() for k in single if k in multi)
    scale = max(h.float().abs().max().item() for _, h in single.values())
    return {"rows": len(single), "same_rows": multi.keys() == single.keys(), "same_tokens": same_tokens,
            "max_abs_diff": diff, "max_abs_value": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="off is always run")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capture_overhead.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("capture_overhead.py measures CUDA-graph decoding: it needs a GPU")

    from benchmarks.longtail import commit_of
    from slipstream.models.weights import decoder_from_hf_module

    device = torch.device("cuda")
    torch.manual_seed(0)
    decoder = decoder_from_hf_module(smollm2_shaped(device))
    rows = []
    check = check_features(decoder, torch.randint(100, 49000, (16, args.prompt), device=device), 64)
    print(f"features of 4-step replays vs single steps, batch 16: {check}", flush=True)
    for batch in args.batches:
        prompts = torch.randint(100, 49000, (batch, args.prompt), device=device)
        off = None
        for variant in ["off"] + [v for v in args.variants if v != "off"]:
            times, handover_us, gpu_us = time_variant(variant, decoder, prompts, args.new_tokens, args.repeats)
            tps = batch * args.new_tokens / min(times)
            off = tps if variant == "off" else off
            step_us = min(times) / args.new_tokens * 1e6
            rows.append({"batch": batch, "variant": variant, "seconds": times, "tokens_per_s": tps,
                         "vs_off": tps / off, "wall_us_per_step": step_us,
                         "handover_host_us_per_step": handover_us, "gpu_in_replays_us_per_step": gpu_us})
            print(f"batch {batch:4d}  {variant:15s} {tps:10.0f} tok/s  {tps / off:.3f}x off  "
                  f"per step: wall {step_us:.0f} us, hand-over (host) {handover_us:.0f} us, "
                  f"GPU in replays {gpu_us:.0f} us  (runs {', '.join(f'{t:.3f}' for t in times)} s)", flush=True)
    import transformers
    import triton

    meta = {"benchmark": "capture_overhead", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__, "commit": commit_of(args.commit),
            "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "feature_check": check, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    if not (check["same_rows"] and check["same_tokens"] and check["max_abs_diff"] <= 0.02 * check["max_abs_value"]):
        raise SystemExit("the features of several-step replays differ from single steps'")


if __name__ == "__main__":
    main()
