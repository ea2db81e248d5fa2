"""Where a learned-drafter engine loses time against `spec=off` in steps that draft nothing (GPU).

    python benchmarks/drafter_engine_gap.py --model /tmp/smollm2-hf [--rounds 4] [--out FILE]

In `drafter_online.py` the learned-drafter engines decode 12-15% slower than `off` at 32-64 live
sequences, where nothing drafts, while `capture_overhead.py` (greedy, EOS ignored, so the decode
replays chain without a break) measures the capture at about `off`'s speed. This script runs the
long-tail workload's rollouts (real weights, temperature 1, sequences ending at their EOS) with
speculation gated off at every batch size (`min_batch_for_off=1`), so that every engine decodes
the same way, and takes the learned-drafter engine apart:

* `off`: no speculation, no capture;
* `suffix`: the suffix-tree engine (the speculator's per-step work, no capture);
* `drafter`: the learned-drafter engine as `drafter_online.py` builds it (drafter-frozen);
* `drafter, sink dropped`: the same, its captured rows handed to a sink that drops them;
* `drafter, no hand-over`: the same, the rows never queued nor handed over (the graphs still
  capture them into the feature ring).

Per engine: the median makespan over `--rounds` rollouts (engines alternate within a round),
tokens/s by live batch, and per rollout: the host's time queueing rows (`emit_step_features`),
indexing them after the next launch and handing them over (`flush_features`, the sink and the
indexing it does included), the decode replays launched unchained (after the host read the
previous one) and chained, and the GPU's time inside the replays (CUDA events around each replay).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.longtail import timed_rollout, workload, write_json  # noqa: E402

VARIANTS = ("off", "suffix", "drafter", "drafter, sink dropped", "drafter, no hand-over")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF directory (SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drafter_engine_gap.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (it times decode graph replays)")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


class Probe:
    """Host time in the hand-over, replays launched unchained / chained and GPU time inside them."""

    def __init__(self, engine, drop_sink: bool, no_handover: bool):
        runner, graphs = engine.runner, engine.runner.graphs
        self.emit_s = self.index_s = self.flush_s = 0.0
        self.flushing = False
        self.unchained = self.chained = 0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        emit, index, flush, launch, replay = (runner.emit_step_features, runner._index_queued_steps,
                                              runner.flush_features, runner.launch_decode_steps, graphs.replay_steps)
        if drop_sink:
            runner.feature_sink = lambda features: None

        def timed_emit(*a, **kw):
            t = time.perf_counter()
            if not no_handover:
                emit(*a, **kw)
            self.emit_s += time.perf_counter() - t

        def timed_index():
            t = time.perf_counter()
            index()
            if not self.flushing:  # else counted in the flush
                self.index_s += time.perf_counter() - t

        def timed_flush(*a, **kw):
            t = time.perf_counter()
            self.flushing = True
            flush(*a, **kw)
            self.flushing = False
            self.flush_s += time.perf_counter() - t

        def counted_launch(seqs, steps, chained=False):
            if chained:
                self.chained += 1
            else:
                self.unchained += 1
            return launch(seqs, steps, chained=chained)

        def timed_replay(*a, **kw):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = replay(*a, **kw)
            end.record()
            self.events.append((start, end))
            return out

        runner.emit_step_features, runner.flush_features = timed_emit, timed_flush
        runner._index_queued_steps = timed_index
        runner.launch_decode_steps, graphs.replay_steps = counted_launch, timed_replay

    def take(self) -> dict:
        torch.cuda.synchronize()
        out = {"emit_ms": self.emit_s * 1e3, "index_ms": self.index_s * 1e3, "flush_ms": self.flush_s * 1e3,
               "unchained_replays": self.unchained, "chained_replays": self.chained,
               "gpu_in_replays_ms": sum(a.elapsed_time(b) for a, b in self.events)}
        self.emit_s = self.index_s = self.flush_s = 0.0
        self.unchained = self.chained = 0
        self.events.clear()
        return out


def build(args, variant: str, decoder, tokenizer, device):
    from benchmarks.drafter_online import build_engines, drafter_settings

    # nothing drafts at any batch size: every engine decodes the same way
    ns = argparse.Namespace(kv_cache_gb=6.0, prompts=args.prompts, samples=args.samples, max_num_batched_tokens=8192,
                            longest_prompt=args.longest_prompt, max_tokens=args.max_tokens,
                            spec_set=["min_batch_for_off=1"], no_drafter_graphs=True, train_on="off",
                            modes=[{"off": "off", "suffix": "suffix"}.get(variant, "drafter-frozen")])
    engines, *_ = build_engines(ns, decoder, tokenizer, drafter_settings([]), device)
    engine = next(iter(engines.values()))
    probe = Probe(engine, drop_sink=variant == "drafter, sink dropped", no_handover=variant == "drafter, no hand-over")
    return engine, probe


def main(argv=None) -> dict:
    args = parse_args(argv)
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.config import ModelConfig
    from slipstream.rollout.types import Request, SamplingParams

    device = torch.device("cuda")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model, dtype="bfloat16"), device)
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16, device=device)
    _, _, prompts = workload(tokenizer, args.prompts)
    args.longest_prompt = max(len(ids) for ids in prompts.values())
    built = {v: build(args, v, decoder, tokenizer, device) for v in args.variants}

    def requests(seed):
        params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
        return [Request(ids, params, uid, f"{seed}-{uid}") for uid, ids in prompts.items()]

    for engine, probe in built.values():  # graphs captured, kernels compiled: not timed
        engine.generate(requests(0), history=False)
        probe.take()
    rows = {v: [] for v in args.variants}
    for r in range(1, args.rounds + 1):
        order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
        for v in order:  # the same seed for every engine: the same sequences, token for token
            engine, probe = built[v]
            _, measured = timed_rollout(engine, requests(r), device)
            rows[v].append({"makespan_s": measured["makespan_s"], "tokens": measured["tokens"],
                            "by_live_batch": measured.get("by_live_batch", {}), **probe.take()})
    summary = {}
    base = statistics.median(x["makespan_s"] for x in rows[args.variants[0]])
    print(f"{'engine':24s} {'makespan':>9s} {'vs ' + args.variants[0]:>8s} {'emit':>7s} {'index':>7s} {'flush':>7s} "
          f"{'unchained':>9s} {'chained':>8s} {'GPU in replays':>14s}  tok/s by live batch")
    for v in args.variants:
        med = statistics.median(x["makespan_s"] for x in rows[v])
        mean = {k: statistics.mean(x[k] for x in rows[v]) for k in ("emit_ms", "index_ms", "flush_ms",
                                                                    "unchained_replays", "chained_replays",
                                                                    "gpu_in_replays_ms")}
        buckets = {}
        for x in rows[v]:
            for b, m in x["by_live_batch"].items():
                acc = buckets.setdefault(b, [0.0, 0.0])
                acc[0] += m["tokens"]
                acc[1] += m["seconds"]
        by_live = {b: t / s for b, (t, s) in sorted(buckets.items(), key=lambda kv: int(kv[0])) if s > 0}
        summary[v] = {"makespan_median_s": med, "vs_first": base / med, **mean, "tokens_per_s_by_live": by_live}
        print(f"{v:24s} {med:8.3f}s {base / med:7.3f}x {mean['emit_ms']:6.1f}ms {mean['index_ms']:6.1f}ms "
              f"{mean['flush_ms']:6.1f}ms {mean['unchained_replays']:9.0f} {mean['chained_replays']:8.0f} "
              f"{mean['gpu_in_replays_ms']:12.1f}ms  "
              + " ".join(f"{b}:{t / 1e3:.1f}k" for b, t in by_live.items()))
    return write_json(args.out, "drafter_engine_gap", args, device, summary=summary, rounds=rows)

if __name__ == "__main__":
    main()
