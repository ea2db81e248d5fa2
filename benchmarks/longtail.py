"""The long-tail rollout workload: speculation off vs suffix-tree speculation on the same engine.

    python benchmarks/longtail.py --model PATH_TO_SMOLLM2_135M_INSTRUCT --commit SHA       # GPU
    python benchmarks/longtail.py --model PATH --spec-set min_batch_for_off=128 \
        'bucket_edges=[1,2,4,8,16,32,64,128]'                                               # policy variants
    python benchmarks/longtail.py --device cpu --model tiny-random --prompts 4 --samples 2 \\
        --max-tokens 32 --rounds 2 --kv-cache-gb 0.05 --out /tmp/longtail.json               # CPU check

Arithmetic prompts (the task's training problems, in order) x samples each, temperature 1.0, up
to max_tokens new tokens, for several consecutive rounds over the same prompts (round r is seeded
r in both modes), as an RL run's rollouts of a recurring prompt set: the suffix drafter's
windows fill from earlier rounds. The two modes run on two engines that share the decoder
weights, interleaved round by round, in one process on one device. Per round and mode: makespan
(the wall clock of `Engine.generate`), generated tokens and tokens/s, drafted and accepted tokens,
mean acceptance length, the time spent with fewer than 16 live sequences, and throughput per
live-batch bucket. A round's outputs are indexed into the drafter's windows while the next
round waits for the GPU (or when a draft first reads them), so that work is in the makespan.
The summary compares the last round. Writes benchmarks/results/longtail.json.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SMALL_BATCH = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF directory (SmolLM2-135M-Instruct) or a registered name")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5, help="consecutive rollouts over the same prompts")
    p.add_argument("--kv-cache-gb", type=float, default=20.0, help="KV cache of each of the two engines")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--spec-config", default="suffix", help="option of conf/spec/ for the speculative engine")
    p.add_argument("--spec-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the spec option's keys, e.g. min_batch_for_off=128 "
                        "'bucket_edges=[1,2,4,8,16,32,64,128]'")
    p.add_argument("--min-bucket-seconds", type=float, default=0.25,
                   help="the worst-bucket figure counts buckets where both engines spent at least this long "
                        "(shorter ones are mostly timing noise)")
    p.add_argument("--commit", default=None,
                   help="commit to record (default: $SLIPSTREAM_COMMIT, else git rev-parse of this checkout)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longtail.json"))
    args = p.parse_args(argv)
    for name in ("prompts", "samples", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu for a small check)")
    return args


def commit_of(arg: str | None) -> str | None:
    # The GPU machine gets a copy of the tree without .git: --commit or SLIPSTREAM_COMMIT names it.
    if arg or os.environ.get("SLIPSTREAM_COMMIT"):
        return arg or os.environ["SLIPSTREAM_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def write_json(out: str, benchmark: str, args, device: torch.device, **payload) -> dict:
    """`payload` under a `meta` of the benchmark, device, torch version, commit and arguments, to `out`."""
    meta = {"benchmark": benchmark,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "commit": commit_of(args.commit),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "commit")}}
    result = {"meta": meta, **payload}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bucket_throughput(steps, edges: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Tokens/s of the steps whose live batch falls in each bucket (keyed by its lower edge)."""
    acc: dict[int, list[float]] = {}
    for s in steps:
        edge = edges[max(bisect.bisect_right(edges, s.live) - 1, 0)]
        a = acc.setdefault(edge, [0.0, 0.0, 0.0])
        a[0] += s.emitted
        a[1] += s.seconds
        a[2] += s.seconds if s.speculative else 0.0
    return {str(e): {"tokens": t, "seconds": sec, "tokens_per_s": t / sec if sec else 0.0,
                     "speculative_seconds": spec}
            for e, (t, sec, spec) in sorted(acc.items())}


def workload(tokenizer, num_prompts: int):
    """The task's first `num_prompts` training problems and their encoded prompts, by uid."""
    from slipstream.config import TaskConfig
    from slipstream.tasks import build_task
    from slipstream.trainer.rl_loop import encode_prompt

    task = build_task(TaskConfig(num_train=max(num_prompts, 64)))
    problems = task.train_problems()[:num_prompts]
    return task, problems, {p.uid: encode_prompt(tokenizer, p, None) for p in problems}


def spec_option(name: str, overrides: list[str]):
    """The `SpeculationConfig` of option `name` of conf/spec/ with KEY=VALUE overrides."""
    from omegaconf import OmegaConf

    from slipstream.config import SpeculationConfig, conf_dir

    spec_file = conf_dir() / "spec" / f"{name}.yaml"
    if not spec_file.is_file():
        raise SystemExit(f"spec option {name!r}: no {spec_file}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SpeculationConfig), OmegaConf.load(spec_file),
                                               OmegaConf.from_dotlist(overrides)))


def run_round(engine, requests, device) -> dict:
    return timed_rollout(engine, requests, device)[1]


def timed_rollout(engine, requests, device) -> tuple[list, dict]:
    """The completions of one `generate` and its measurements (see the module docstring)."""
    from slipstream.telemetry.gc_time import GCTime

    sync(device)
    with GCTime() as gc_time:
        t0 = time.perf_counter()
        completions = engine.generate(requests)
        sync(device)
        makespan = time.perf_counter() - t0
    tokens = sum(len(c.tokens) for c in completions)
    metrics = engine.rollout_metrics(SMALL_BATCH)
    edges = tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}))
    lengths = sorted(len(c.tokens) for c in completions)
    return completions, {
        "makespan_s": makespan,
        "tokens": tokens,
        "tokens_per_s": tokens / makespan,
        "engine_steps": len(engine.timeline.steps),
        "response_length_mean": tokens / len(completions),
        "response_length_p50": lengths[len(lengths) // 2],
        "response_length_max": lengths[-1],
        "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
        f"time_below_batch_{SMALL_BATCH}_s": metrics[f"rollout/time_below_batch_{SMALL_BATCH}"],
        "drafted_tokens": metrics["spec/drafted_tokens"],
        "accepted_tokens": metrics["spec/accepted_tokens"],
        "acceptance_rate": metrics.get("spec/acceptance_rate"),
        "accept_len": metrics.get("spec/accept_len"),
        "accept_len_by_bucket": {k.rsplit("/bs", 1)[1]: v for k, v in metrics.items()
                                 if k.startswith("spec/accept_len/bs")},
        "speculative_steps": metrics["spec/steps_spec"],
        "speculative_seconds": metrics["spec/time_spec_steps"],
        "drafting_s": metrics.get("spec/draft_seconds", 0.0),  # host time indexing and proposing, in the makespan
        # what a slow stretch may be: one long step, one-time work, the garbage collector
        "slowest_step_s": metrics["rollout/slowest_step_s"],
        "graphs_captured": metrics["rollout/graphs_captured"],
        "kernel_timings": metrics["rollout/kernel_timings"],
        "gc_s": gc_time.seconds,
        "by_live_batch": bucket_throughput(engine.timeline.steps, edges),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    from slipstream.config import ConfigError, ModelConfig, engine_spec_config
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model, dtype="float32"), torch.device("cpu"))
    decoder = decoder_from_hf_module(model, dtype=dtype, device=device)
    del model

    _, _, prompts = workload(tokenizer, args.prompts)
    spec_cfg = spec_option(args.spec_config, args.spec_set)
    try:
        spec = engine_spec_config(spec_cfg)
    except ConfigError as e:
        raise SystemExit(f"--spec-config {args.spec_config} --spec-set {' '.join(args.spec_set)}: {e}") from None
    if spec is None:
        raise SystemExit(f"--spec-config {args.spec_config!r} turns speculation off")

    longest_prompt = max(len(p) for p in prompts.values())
    ecfg = EngineConfig(block_size=16, kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.prompts * args.samples,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=longest_prompt + args.max_tokens + 1)
    engines = {"off": Engine(decoder, [tokenizer.eos_token_id], ecfg, seed=0),
               "suffix": Engine(decoder, [tokenizer.eos_token_id], ecfg, seed=0, spec=spec)}
    warm = [Request(next(iter(prompts.values())), SamplingParams(n=2, max_tokens=8, seed=0), "warm", "warm")]
    for engine in engines.values():  # kernels compiled and caches touched before any timed round
        engine.generate(warm)

    rounds = {mode: [] for mode in engines}
    for r in range(args.rounds):
        params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=r)
        requests = [Request(ids, params, uid, f"{r}-{uid}") for uid, ids in prompts.items()]
        for mode, engine in engines.items():
            row = run_round(engine, requests, device)
            rounds[mode].append(row)
            print(f"round {r} {mode:6s}: makespan {row['makespan_s']:8.2f} s  {row['tokens']:7d} tokens  "
                  f"{row['tokens_per_s']:8.0f} tok/s  below {SMALL_BATCH}: "
                  f"{row[f'time_below_batch_{SMALL_BATCH}_s']:7.2f} s  accept_len {row['accept_len'] or 0:.2f}  "
                  f"({row['accepted_tokens']:.0f}/{row['drafted_tokens']:.0f} drafted)", flush=True)

    off, on = rounds["off"][-1], rounds["suffix"][-1]
    slowdowns = {b: on["by_live_batch"][b]["tokens_per_s"] / v["tokens_per_s"]
                 for b, v in off["by_live_batch"].items()
                 if b in on["by_live_batch"] and v["tokens_per_s"] > 0}
    held = {b: r for b, r in slowdowns.items()
            if min(off["by_live_batch"][b]["seconds"], on["by_live_batch"][b]["seconds"]) >= args.min_bucket_seconds}
    summary = {
        "makespan_off_s": off["makespan_s"],
        "makespan_suffix_s": on["makespan_s"],
        "makespan_speedup": off["makespan_s"] / on["makespan_s"],
        "tokens_per_s_off": off["tokens_per_s"],
        "tokens_per_s_suffix": on["tokens_per_s"],
        "acceptance_rate": on["acceptance_rate"],
        "accept_len": on["accept_len"],
        f"time_below_batch_{SMALL_BATCH}_off_s": off[f"time_below_batch_{SMALL_BATCH}_s"],
        f"time_below_batch_{SMALL_BATCH}_suffix_s": on[f"time_below_batch_{SMALL_BATCH}_s"],
        # tokens/s with speculation over tokens/s without, per live-batch bucket of the last round
        "bucket_throughput_ratio": slowdowns,
        # over the buckets that hold time: a 0.1 s bucket swings 10-40% in rounds that draft nothing
        "worst_bucket_ratio": min(held.values()) if held else None,
        "worst_bucket_min_seconds": args.min_bucket_seconds,
    }
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import transformers

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "commit": commit_of(args.commit), "model": args.model,
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "commit")},
            "spec": spec_cfg.__dict__}
    result = {"meta": meta, "summary": summary, "rounds": rounds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list))
    print(f"last round: makespan off {summary['makespan_off_s']:.2f} s, suffix {summary['makespan_suffix_s']:.2f} s "
          f"({summary['makespan_speedup']:.2f}x); worst bucket throughput ratio {summary['worst_bucket_ratio']} "
          f"(buckets of >= {args.min_bucket_seconds} s)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
