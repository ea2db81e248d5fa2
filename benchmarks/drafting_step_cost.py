"""What one drafting step costs against plain decode steps, by live batch and phase (GPU).

    python benchmarks/drafting_step_cost.py --model /tmp/smollm2-hf [--draft-lens 1 2 4] [--out FILE]

The long-tail workload (real weights, temperature 1, sequences ending at their EOS). The learned
drafter is warmed up as in `drafter_online.py`; then every step below 32 live sequences is forced
to draft (`--source drafter` or `suffix`) with a fixed draft length per sequence, and each
speculative step is timed by phase on the host: `propose` (the source's drafts, the learned chain
and its tokens read back), `schedule`, `verify` (the target's extend step and the acceptance,
tokens read back), `postprocess`, `features` (the kept positions handed to the windows) and
`observe`. Against them: the `spec=off` engine's time per decoded token-step in the same bucket
(its replays of 4 steps chained on the device), measured in the same run. Prints, per live batch
bucket, ms per step and tokens per step of both, so the break-even acceptance is visible.

`--device-floor` (CUDA) then times, per batch bucket and draft length, the GPU alone: the engine's
own graphs replayed back to back with nothing on the host between them (CUDA events): the learned
drafter's chain, the verification forward, the acceptance (`verify_drafts`, captured in a graph
here), and the plain decode step (a replay of 4 chained steps, divided by 4); the forwards' inputs
are padding rows (a context of a few tokens in the scratch block: attention is a small part of
this model's step at the tail's contexts of a few hundred tokens). A drafting step
run entirely on the device, with one host read per several steps, would cost about chain +
verify + acceptance; with the accepted tokens per sequence measured above, `ceiling` is the most
such a step could gain over plain decoding: (1 + accepted) x plain / (chain + verify + acceptance).
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

from benchmarks.longtail import sync, workload, write_json  # noqa: E402

PHASES = ("propose", "schedule", "verify", "postprocess", "features", "observe")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF directory (SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a small check of the script")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--warmup-steps", type=int, default=200, help="drafter training steps of the warm start")
    p.add_argument("--source", default="drafter", choices=("drafter", "suffix", "both"))
    p.add_argument("--draft-lens", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=2, help="timed rollouts per engine")
    p.add_argument("--device-floor", action="store_true",
                   help="also time the drafting step's graphs on the GPU alone (see the module docstring)")
    p.add_argument("--floor-buckets", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drafting_step_cost.json"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu for a small check)")
    if any(k < 1 for k in args.draft_lens):
        p.error("--draft-lens must be >= 1")
    return args


def bucket_of(live: int, edges=(1, 2, 4, 8, 16, 32)) -> int:
    return max(e for e in edges if e <= live)


class Phases:
    """Host wall time of each phase of the engine's speculative steps, by live-batch bucket."""

    def __init__(self, engine):
        self.current: dict[str, float] = {}
        self.steps: list[tuple[int, dict[str, float]]] = []
        spec, sch, runner = engine.speculator, engine.scheduler, engine.spec_runner
        for owner, name, phase in ((spec, "propose", "propose"), (sch, "schedule", "schedule"),
                                   (runner, "run", "verify"), (sch, "postprocess_verified", "postprocess"),
                                   (runner, "emit_features", "features"), (spec, "observe", "observe")):
            setattr(owner, name, self._timed(getattr(owner, name), phase))

    def _timed(self, fn, phase):
        def call(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - t
            if phase == "observe" and a and getattr(a[0], "num_draft_tokens", 0):
                self.steps.append((bucket_of(a[1]), self.current))
            if phase == "observe":
                self.current = {}
            return out
        return call


def force(engine, source: str, k: int) -> None:
    """Every step below min_batch_for_off drafts from `source`, k tokens per decoding sequence."""
    spec = engine.speculator
    if hasattr(spec, "sources"):
        spec.sources.choose = lambda live: source
    spec.policy.plan = lambda items, live, arm=None: {sid: k for sid, _ in items}


def replay_ms(graph, iters: int = 50) -> float:
    """GPU milliseconds per replay of `graph`, replays back to back."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def device_floor(engine, buckets: list[int], draft_lens: list[int], accepted: dict) -> list[dict]:
    """GPU time of each part of a drafting step and of a plain decode step (module docstring).
    `accepted`: (draft length, bucket) -> accepted tokens per verified sequence in the rollouts."""
    from slipstream.rollout.cuda_graph import capture_graph
    from slipstream.rollout.spec.verify import verify_drafts

    runner, verify = engine.runner, engine.spec_runner._verify_graphs()
    slot = engine.speculator.slot
    chains = slot._graphs[slot._front]  # the front copy's DraftGraphs (what drafts use)
    decode, steps = runner.graphs, engine.cfg.decode_steps
    device, V = runner.device, runner.decoder.config.vocab_size
    rows = []
    for B in buckets:
        if (B, steps) not in decode.graphs:
            decode._capture(B, steps)
        # the static inputs' layout depends on the bucket: padding rows for this one
        decode._fill([], B)
        decode.staging.copy_(decode.host)
        plain = replay_ms(decode.graphs[B, steps][0]) / steps
        for k in draft_lens:
            cb, ck = chains.shape_for(B, k)
            if (cb, ck) not in chains.graphs:
                chains._capture(cb, ck)
            chain = replay_ms(chains.graphs[cb, ck][0])
            vb, Q = verify.shape_for(B, k)
            if (vb, Q) not in verify.graphs:
                verify._capture(vb, Q)
            verify._fill([], vb, Q)
            verify.staging.copy_(verify.host)
            forward = replay_ms(verify.graphs[vb, Q][0])
            gen = torch.Generator(device).manual_seed(0)
            logits = torch.randn(B, k + 1, V, device=device, generator=gen)
            drafts = torch.randint(0, V, (B, k), device=device, generator=gen)
            probs = torch.softmax(torch.randn(B, k, V, device=device, generator=gen), -1)
            lens = torch.full((B,), k, dtype=torch.long, device=device)
            ones = torch.ones(B, device=device)
            graph, _ = capture_graph(lambda: verify_drafts(logits, drafts, lens, ones, ones, lens * 0, probs,
                                                           truncate=False), device)
            accept = replay_ms(graph)
            a = accepted.get((k, B))
            total = chain + forward + accept
            row = {"bucket": B, "draft_len": k, "chain_ms": chain, "verify_forward_ms": forward,
                   "acceptance_ms": accept, "drafting_step_gpu_ms": total, "plain_step_gpu_ms": plain,
                   "accepted_per_seq": a, "ceiling": None if a is None else (1 + a) * plain / total}
            rows.append(row)
            print(f"device floor B={B} k={k}: chain {chain:.3f} + verify {forward:.3f} + acceptance {accept:.3f} "
                  f"= {total:.3f} ms against plain {plain:.3f} ms/step; accepted {a if a is None else round(a, 2)}"
                  f" -> ceiling {row['ceiling'] if a is None else round(row['ceiling'], 2)}x", flush=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    from benchmarks.drafter_online import build_engines, drafter_settings, warm_start
    from slipstream.config import ModelConfig
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.types import Request, SamplingParams

    device = torch.device(args.device)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model, dtype="float32"), torch.device("cpu"))
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                     device=device)
    _, _, prompts = workload(tokenizer, args.prompts)
    mode = {"drafter": "drafter-online", "suffix": "suffix", "both": "both"}[args.source]
    ns = argparse.Namespace(kv_cache_gb=6.0, prompts=args.prompts, samples=args.samples, max_num_batched_tokens=8192,
                            longest_prompt=max(len(ids) for ids in prompts.values()), max_tokens=args.max_tokens,
                            spec_set=[], no_drafter_graphs=False, train_on="off", modes=["off", mode])
    engines, frozen, online, ecfg, _ = build_engines(ns, decoder, tokenizer, drafter_settings([]), device)

    def requests(seed):
        params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
        return [Request(ids, params, uid, f"{seed}-{uid}") for uid, ids in prompts.items()]

    for engine in engines.values():
        engine.generate(requests(0), history=False)
    warm = warm_start(online, frozen, decoder, tokenizer, ecfg, requests(0), args.warmup_steps, device)
    print(f"warm start: {warm['train_steps']} steps, loss {warm['loss']}", flush=True)

    off = engines["off"]
    off_steps = []
    for r in range(args.rounds):
        sync(device)
        off.generate(requests(100 + r))
        sync(device)
        off_steps += off.timeline.steps
    base = {}
    for s in off_steps:
        if s.live < 32:
            acc = base.setdefault(bucket_of(s.live), [0.0, 0, 0])
            acc[0] += s.seconds
            acc[1] += s.emitted
            acc[2] += 1
    rows = []
    engine = engines[mode]
    phases = Phases(engine)
    for k in args.draft_lens:
        force(engine, args.source, k)
        phases.steps.clear()
        spec_steps = []
        for r in range(args.rounds):
            engine.generate(requests(100 + r), history=False)
            spec_steps += [s for s in engine.timeline.steps if s.speculative]
        by_bucket: dict[int, dict] = {}
        for s in spec_steps:
            acc = by_bucket.setdefault(bucket_of(s.live), {"steps": 0, "seconds": 0.0, "emitted": 0, "seqs": 0,
                                                           "drafted": 0, "accepted": 0})
            acc["steps"] += 1
            acc["seconds"] += s.seconds
            acc["emitted"] += s.emitted
            acc["seqs"] += s.verified_seqs
            acc["drafted"] += s.drafted
            acc["accepted"] += s.accepted
        phase_ms: dict[int, dict[str, float]] = {}
        for b, ph in phases.steps:
            for name in PHASES:
                phase_ms.setdefault(b, {n: [] for n in PHASES})[name].append(ph.get(name, 0.0) * 1e3)
        for b in sorted(by_bucket):
            acc = by_bucket[b]
            off_s, off_tok, off_n = base.get(b, (0.0, 0, 0))
            row = {"draft_len": k, "bucket": b, "spec_steps": acc["steps"],
                   "spec_ms_per_step": acc["seconds"] / acc["steps"] * 1e3,
                   "spec_tokens_per_step": acc["emitted"] / acc["steps"],
                   "accepted_per_verification": acc["accepted"] / max(acc["seqs"], 1),
                   "spec_tokens_per_s": acc["emitted"] / acc["seconds"],
                   "off_ms_per_step": off_s / off_n * 1e3 if off_n else None,
                   "off_tokens_per_step": off_tok / off_n if off_n else None,
                   "off_tokens_per_s": off_tok / off_s if off_s else None,
                   "phases_ms": {n: statistics.mean(v) for n, v in phase_ms.get(b, {}).items() if v}}
            rows.append(row)
            ph = " ".join(f"{n} {v:.2f}" for n, v in row["phases_ms"].items())
            off_txt = (f"off {row['off_ms_per_step']:.2f} ms/step {row['off_tokens_per_s'] / 1e3:.1f}k tok/s"
                       if off_n else "off -")
            print(f"k={k} live {b:>2}+: {acc['steps']:4d} steps  {row['spec_ms_per_step']:.2f} ms/step "
                  f"{row['spec_tokens_per_step']:.1f} tok/step (accepted {row['accepted_per_verification']:.2f}/seq) "
                  f"{row['spec_tokens_per_s'] / 1e3:.1f}k tok/s | {off_txt} | {ph}", flush=True)
    floor = []
    if args.device_floor and device.type == "cuda":
        accepted = {(r["draft_len"], r["bucket"]): r["accepted_per_verification"] for r in rows}
        # a floor bucket B is compared with the rollouts' bucket of B live sequences
        floor = device_floor(engine, args.floor_buckets, args.draft_lens,
                             {(k, B): accepted.get((k, bucket_of(B))) for k in args.draft_lens
                              for B in args.floor_buckets})
    return write_json(args.out, "drafting_step_cost", args, device, warm_start=warm, rows=rows, device_floor=floor)

if __name__ == "__main__":
    main()
