"""Accuracy of skip-softmax (BLASST) attention: per-token KL to dense attention and task accuracy.

    python benchmarks/blasst_accuracy.py --model PATH_TO_SMOLLM2_HF_DIR --commit SHA          # GPU
    python benchmarks/blasst_accuracy.py --device cpu --model tiny-random --contexts 128 256 \\
        --eval-problems 16 --out /tmp/ba.json                                                 # CPU check

Contexts (no dataset): the first `--num-contexts` training problems of the default recipe's
arithmetic task, as chat prompts, are continued by the model itself on the dense engine at
temperature 1.0 (seeded; end-of-sequence ignored, so a sample runs on past its answer into chat
turns the model invents) up to the longest of `--contexts` tokens. The context of length L is the
first L tokens of each sample. Lengths above the model's max_position_embeddings are dropped.

Settings: per `--targets` sparsity, slipstream's calibration (`calibrate_skip_scale`, the
bisection behind `slipstream calibrate-sparsity`) finds for each phase the smallest scale whose
measured tile sparsity reaches the target on the longest contexts: the prefill scale on one
packed prefill of them, the decode scale on `--calibrate-decode-tokens` greedy tokens decoded
after them. `--scales` adds fixed settings: S (both phases) or PREFILL:DECODE.

KL (`slipstream.rollout.teacher_forcing`): KL(dense || skip-softmax) of the next-token
distribution at every position of the contexts, teacher-forced. Prefill: per context length, one
packed prefill forward of all contexts, dense and with the prefill scale. Decode: the longest
contexts fed 16 tokens per step over the paged cache (as decode and speculative verification
run), dense and with each decode scale in lockstep. lambda = scale / current length, so the rows
at positions < L are exactly those of contexts of length L: each length reports them, with the
tile counters up to the step that reaches L.

Accuracy: greedy on `--eval-problems` held-out problems of the default recipe's task (its prompts
and `rollout.eval_max_tokens`), a dense engine vs one engine per setting, with the recipe's
rollout engine settings. Its plain prompts are short (a tile or two, nothing to skip), so each
setting is also evaluated with every prompt preceded by solved training problems as earlier
chat turns, up to `--eval-context` tokens (one shared prefix). The difference is paired (same
problems): standard error = std(per-problem difference) / sqrt(n).

Writes benchmarks/results/blasst_accuracy.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from slipstream.kernels.attention import MAX_DECODE_Q_LEN  # noqa: E402

BLOCK_SIZE = 16
SCALE_RANGE = (1e-4, 1e6)  # the calibration's default bracket: no skipping to nearly all tiles skipped
SCALE_PRECISION = 0.01  # bisect until the bracket's ends are within 1% (12 steps over SCALE_RANGE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF directory (SmolLM2-135M-Instruct) or a registered name")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="context lengths in tokens (capped by the model's max positions)")
    p.add_argument("--num-contexts", type=int, default=4, help="sampled contexts per length")
    p.add_argument("--targets", type=float, nargs="*", default=[0.5, 0.7],
                   help="tile sparsities to calibrate a setting for")
    p.add_argument("--scales", nargs="*", default=[], help="fixed settings: S (both phases) or PREFILL:DECODE")
    p.add_argument("--calibrate-decode-tokens", type=int, default=16,
                   help="greedy tokens decoded after each context to calibrate the decode scale")
    p.add_argument("--eval-problems", type=int, default=512, help="held-out arithmetic problems")
    p.add_argument("--eval-context", type=int, default=None,
                   help="tokens of solved problems before each eval prompt (default: half the longest context; "
                        "0: plain prompts only)")
    p.add_argument("--kv-cache-gb", type=float, default=8.0, help="most KV cache an evaluation engine takes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a tiny CPU check gains nothing from more, and on shared "
                        "cores the threads' waits on each other cost far more)")
    p.add_argument("--commit", default=None,
                   help="commit to record (default: $SLIPSTREAM_COMMIT, else git rev-parse of this checkout)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blasst_accuracy.json"))
    args = p.parse_args(argv)
    if any(n < 2 for n in args.contexts):
        p.error("--contexts must be >= 2 tokens")
    for name in ("num_contexts", "eval_problems", "calibrate_decode_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 0.0 < t < 1.0 for t in args.targets):
        p.error("--targets must lie in (0, 1)")
    try:
        args.fixed = [parse_scale(s) for s in args.scales]
    except ValueError as e:
        p.error(str(e))
    if not args.targets and not args.fixed:
        p.error("nothing to measure: give --targets and/or --scales")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu for a small check)")
    return args


def parse_scale(text: str) -> tuple[float, float]:
    """'S' -> (S, S); 'P:D' -> (P, D)."""
    parts = text.split(":")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise ValueError(f"--scales entry {text!r}: expected a positive scale S or PREFILL:DECODE")
    return values[0], values[-1]


def commit_of(arg: str | None) -> str | None:
    # The GPU machine gets a copy of the tree without .git: --commit or SLIPSTREAM_COMMIT names it.
    if arg or os.environ.get("SLIPSTREAM_COMMIT"):
        return arg or os.environ["SLIPSTREAM_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def blocks_for(tokens_per_seq: list[int]) -> int:
    return sum(-(-n // BLOCK_SIZE) for n in tokens_per_seq) + 1


# ----------------------------------------------------------------------------------------------
# Contexts and calibration


def sample_contexts(decoder, prompts: list[list[int]], length: int, seed: int) -> list[list[int]]:
    """Each prompt continued at temperature 1.0 to exactly `length` tokens (no end-of-sequence)."""
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    if max(map(len, prompts)) >= length:
        raise SystemExit(f"a context prompt has {max(map(len, prompts))} tokens, not shorter than the longest "
                         f"context ({length}): raise --contexts")
    cfg = EngineConfig(block_size=BLOCK_SIZE, num_blocks=blocks_for([length + 1] * len(prompts)),
                       max_num_seqs=len(prompts), max_model_len=length + 1)
    engine = Engine(decoder, [], cfg, seed=seed)  # no eos ids: every sample runs to max_tokens
    reqs = [Request(p, SamplingParams(temperature=1.0, max_tokens=length - len(p), seed=seed), f"c{i}", f"c{i}")
            for i, p in enumerate(prompts)]
    contexts = [c.prompt_ids + c.tokens for c in engine.generate(reqs)]
    assert all(len(c) == length for c in contexts), [len(c) for c in contexts]
    return contexts


def calibrate(decoder, contexts: list[list[int]], targets: list[float], decode_tokens: int) -> list[dict]:
    """Per target and phase, slipstream's bisection for the smallest scale reaching it on `contexts`.

    Every probe of a phase brackets the later targets too: each bisection starts from the
    tightest bracket the earlier probes give and stops once it is within SCALE_PRECISION.
    """
    from slipstream.rollout.calibration import calibrate_skip_scale
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    length = len(contexts[0])
    # Prefix sharing off: the contexts share their chat preamble, and the prefill must cover all of them.
    base = EngineConfig(block_size=BLOCK_SIZE, num_blocks=blocks_for([length + 1] * len(contexts)),
                        max_num_seqs=len(contexts), max_num_batched_tokens=length * len(contexts),
                        max_model_len=length + 1, enable_prefix_sharing=False, cuda_graphs=False)
    requests = {
        "prefill": [Request(c, SamplingParams(temperature=0.0, max_tokens=1), f"p{i}", f"p{i}")
                    for i, c in enumerate(contexts)],
        "decode": [Request(c[:length - decode_tokens], SamplingParams(temperature=0.0, max_tokens=decode_tokens),
                           f"d{i}", f"d{i}") for i, c in enumerate(contexts)],
    }
    probed: dict[str, list[tuple[float, float]]] = {phase: [] for phase in requests}
    results = []
    for target in targets:
        out = {}
        for phase, reqs in requests.items():
            def make(scale, phase=phase):
                # one rollout per engine: only the graphs it uses are captured
                return Engine(decoder, [], dataclasses.replace(base, capture_graphs_at_start=False,
                                                               **{f"{phase}_skip_scale": scale}))

            lo = max([sc for sc, sp in probed[phase] if sp < target], default=SCALE_RANGE[0])
            hi = min([sc for sc, sp in probed[phase] if sp >= target], default=SCALE_RANGE[1])
            # hi <= lo: even the range's end missed this target; the bisection stops after probing it.
            steps = math.log(hi / lo) / math.log1p(SCALE_PRECISION) if hi > lo else 1.0
            iters = max(1, math.ceil(math.log2(steps)))
            r = calibrate_skip_scale(make, reqs, phase, target, lo=lo, hi=hi, iters=iters)
            probed[phase] += r.trials
            out[phase] = {"scale": r.scale, "sparsity": r.sparsity, "reached": r.sparsity >= target,
                          "trials": r.trials}
        results.append(out)
    return results


# ----------------------------------------------------------------------------------------------
# KL to dense, teacher-forced


def kl_stats(kl: torch.Tensor) -> dict:
    kl = kl.float().flatten()
    return {"tokens": kl.numel(), "mean_kl": kl.mean().item(), "p99_kl": torch.quantile(kl, 0.99).item(),
            "max_kl": kl.max().item()}


def tile_sparsity(counters: torch.Tensor) -> float:
    skipped, visited = counters.tolist()
    return skipped / visited if visited else 0.0


def prefill_kl(decoder, contexts: list[list[int]], lengths: list[int], settings: list[dict]) -> list[dict]:
    """Per length and setting: one packed prefill forward of the contexts cut to that length."""
    from slipstream.rollout.teacher_forcing import next_token_kl, teacher_forced_steps

    rows = []
    for length in lengths:
        seqs = [c[:length] for c in contexts]
        dense = next(teacher_forced_steps(decoder, seqs, block_size=BLOCK_SIZE)).hidden
        for s in settings:
            counters = torch.zeros(2, dtype=torch.int64, device=dense.device)
            sparse = next(teacher_forced_steps(decoder, seqs, skip_scale=s["prefill_scale"], counters=counters,
                                               block_size=BLOCK_SIZE)).hidden
            rows.append({"setting": s["name"], "phase": "prefill", "context": length,
                         "scale": s["prefill_scale"], "sparsity": tile_sparsity(counters),
                         **kl_stats(next_token_kl(decoder, dense, sparse))})
    return rows


def decode_kl(decoder, contexts: list[list[int]], lengths: list[int], settings: list[dict]) -> list[dict]:
    """The contexts fed MAX_DECODE_Q_LEN tokens per step, dense and every setting in lockstep."""
    from slipstream.rollout.teacher_forcing import next_token_kl, teacher_forced_steps

    device = decoder.embed.weight.device
    longest = len(contexts[0])
    counters = [torch.zeros(2, dtype=torch.int64, device=device) for _ in settings]
    runs = [teacher_forced_steps(decoder, contexts, MAX_DECODE_Q_LEN, block_size=BLOCK_SIZE)]
    runs += [teacher_forced_steps(decoder, contexts, MAX_DECODE_Q_LEN, skip_scale=s["decode_scale"], counters=c,
                                  block_size=BLOCK_SIZE) for s, c in zip(settings, counters)]
    kl = torch.zeros(len(settings), len(contexts), longest, device=device)
    at_length = {}  # length -> counters of each setting after the step that reaches it
    done = 0
    for dense, *sparse in zip(*runs):
        for i, step in enumerate(sparse):
            kl[i, step.seq_index, step.positions] = next_token_kl(decoder, dense.hidden, step.hidden)
        before, done = done, done + MAX_DECODE_Q_LEN  # the contexts have one length: steps stay aligned
        for length in lengths:
            if before < length <= done:
                at_length[length] = [c.clone() for c in counters]
    return [{"setting": s["name"], "phase": "decode", "context": length, "scale": s["decode_scale"],
             "sparsity": tile_sparsity(at_length[length][i]), **kl_stats(kl[i, :, :length])}
            for length in lengths for i, s in enumerate(settings)]


# ----------------------------------------------------------------------------------------------
# Task accuracy


def eval_prompts(tokenizer, problems, shots, system_prompt: str | None, context: int) -> list[list[int]]:
    """Chat prompts of `problems`, after as many solved `shots` as earlier turns as fit in `context` tokens."""
    from slipstream.trainer.rl_loop import encode_prompt

    if context == 0:
        return [encode_prompt(tokenizer, p, system_prompt) for p in problems]
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns: list[dict] = []
    for shot in shots:
        more = turns + [{"role": "user", "content": shot.question},
                        {"role": "assistant", "content": shot.meta["solution"]}]
        text = tokenizer.apply_chat_template(head + more, tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > context:
            break
        turns = more
    else:
        raise SystemExit(f"the task's {len(shots)} training problems fill less than --eval-context={context} tokens")
    prompts = []
    for p in problems:
        messages = head + turns + [{"role": "user", "content": p.question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def evaluate(engine, tokenizer, task, problems, prompts, max_tokens: int, seed: int) -> tuple[list[float], dict]:
    """Per-problem greedy reward, and the engine's measured sparsity per phase."""
    from slipstream.rollout.types import Request, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed)
    reqs = [Request(ids, params, p.uid, p.uid) for p, ids in zip(problems, prompts)]
    engine.sparsity()  # counters from here on
    comps = engine.generate(reqs, history=False)
    texts = tokenizer.batch_decode([c.tokens for c in comps], skip_special_tokens=True)
    return [task.reward(p, t) for p, t in zip(problems, texts)], engine.sparsity()


def paired_difference(dense: list[float], other: list[float]) -> tuple[float, float]:
    """(mean of other - dense, its standard error), in points."""
    diffs = [b - a for a, b in zip(dense, other)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return 100 * mean, 100 * math.sqrt(var / n)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from slipstream.config import compose
    from slipstream.models import resolve_model
    from slipstream.models.weights import load_decoder
    from slipstream.rollout.engine import Engine, EngineConfig, kv_blocks_for
    from slipstream.tasks import build_task
    from slipstream.trainer.rl_loop import encode_prompt

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    decoder, config = load_decoder(args.model, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    recipe = compose(["recipe=default"])
    task_cfg = dataclasses.replace(recipe.task, num_eval=args.eval_problems)
    task = build_task(task_cfg)

    lengths = sorted({n for n in args.contexts if n <= config.max_position_embeddings})
    if not lengths:
        raise SystemExit(f"every --contexts length exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    longest = lengths[-1]
    if args.calibrate_decode_tokens >= longest:
        raise SystemExit(f"--calibrate-decode-tokens={args.calibrate_decode_tokens} must be below the longest "
                         f"context ({longest})")
    t0 = time.perf_counter()
    seed_problems = task.train_problems()[:args.num_contexts]
    prompts = [encode_prompt(tokenizer, p, task_cfg.system_prompt) for p in seed_problems]
    contexts = sample_contexts(decoder, prompts, longest, args.seed)
    print(f"{len(contexts)} contexts of {longest} tokens sampled in {time.perf_counter() - t0:.1f} s", flush=True)

    settings = []
    t0 = time.perf_counter()
    for target, cal in zip(args.targets, calibrate(decoder, contexts, args.targets, args.calibrate_decode_tokens)):
        settings.append({"name": f"target {target:g}", "target": target, "prefill_scale": cal["prefill"]["scale"],
                         "decode_scale": cal["decode"]["scale"], "calibration": cal})
        found = ", ".join(f"{phase} scale {c['scale']:.4g} (sparsity {c['sparsity']:.3f}"
                          f"{'' if c['reached'] else ', target not reachable'})" for phase, c in cal.items())
        print(f"target {target:g}: {found}", flush=True)
    print(f"calibrated in {time.perf_counter() - t0:.1f} s", flush=True)
    for prefill_scale, decode_scale in args.fixed:
        settings.append({"name": f"scale {prefill_scale:g}:{decode_scale:g}", "target": None,
                         "prefill_scale": prefill_scale, "decode_scale": decode_scale, "calibration": None})

    t0 = time.perf_counter()
    kl_rows = prefill_kl(decoder, contexts, lengths, settings) + decode_kl(decoder, contexts, lengths, settings)
    print(f"KL measured in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    rc = recipe.rollout
    eval_context = longest // 2 if args.eval_context is None else args.eval_context
    problems = task.eval_problems()
    prompt_sets = {0: eval_prompts(tokenizer, problems, [], task_cfg.system_prompt, 0)}
    if eval_context > 0:
        prompt_sets[eval_context] = eval_prompts(tokenizer, problems, task.train_problems(),
                                                 task_cfg.system_prompt, eval_context)
    longest_prompt = max(len(p) for ps in prompt_sets.values() for p in ps)
    max_model_len = longest_prompt + rc.eval_max_tokens + 1
    if max_model_len > config.max_position_embeddings:
        raise SystemExit(f"eval prompts of up to {longest_prompt} tokens + {rc.eval_max_tokens} new exceed the "
                         f"model's {config.max_position_embeddings} positions: lower --eval-context")
    seqs = min(rc.max_num_seqs, len(problems))
    base = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=seqs, max_model_len=max_model_len,
                        max_num_batched_tokens=max(rc.max_num_batched_tokens, longest_prompt),
                        cuda_graphs=rc.cuda_graphs)
    # Room for a full batch without prefix sharing, up to --kv-cache-gb (preemption covers the rest).
    base.num_blocks = min(blocks_for([max_model_len] * seqs),
                          kv_blocks_for(decoder, dataclasses.replace(base, kv_cache_gb=args.kv_cache_gb)))
    accuracy_rows, dense_scores = [], {}
    for s in [{"name": "dense", "prefill_scale": 0.0, "decode_scale": 0.0}] + settings:
        engine = Engine(decoder, [tokenizer.eos_token_id], dataclasses.replace(
            base, prefill_skip_scale=s["prefill_scale"], decode_skip_scale=s["decode_scale"]), seed=args.seed)
        for context, prompts_ in prompt_sets.items():
            scores, sparsity = evaluate(engine, tokenizer, task, problems, prompts_, rc.eval_max_tokens, args.seed)
            if s["name"] == "dense":
                dense_scores[context] = scores
            diff, se = paired_difference(dense_scores[context], scores)
            accuracy_rows.append({"setting": s["name"], "eval_context": context, "problems": len(scores),
                                  "prompt_tokens_mean": sum(map(len, prompts_)) / len(prompts_),
                                  "accuracy": sum(scores) / len(scores),
                                  "dense_accuracy": sum(dense_scores[context]) / len(scores),
                                  "diff_points": diff, "diff_se_points": se,
                                  "prefill_sparsity": sparsity.get("prefill", 0.0),
                                  "decode_sparsity": sparsity.get("decode", 0.0)})
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"accuracy measured in {time.perf_counter() - t0:.1f} s", flush=True)

    print(f"\n{'setting':16s} {'phase':8s} {'context':>7s} {'scale':>9s} {'sparsity':>8s} {'mean KL':>9s} "
          f"{'p99 KL':>9s} {'max KL':>9s}")
    for r in kl_rows:
        print(f"{r['setting']:16s} {r['phase']:8s} {r['context']:7d} {r['scale']:9.4g} {r['sparsity']:8.3f} "
              f"{r['mean_kl']:9.2e} {r['p99_kl']:9.2e} {r['max_kl']:9.2e}")
    print(f"\n{'setting':16s} {'eval ctx':>8s} {'accuracy':>8s} {'dense':>7s} {'diff (pts)':>15s} "
          f"{'prefill sp':>10s} {'decode sp':>9s}")
    for r in accuracy_rows:
        print(f"{r['setting']:16s} {r['eval_context']:8d} {r['accuracy']:8.3f} {r['dense_accuracy']:7.3f} "
              f"{r['diff_points']:+7.2f} ± {r['diff_se_points']:5.2f} {r['prefill_sparsity']:10.3f} "
              f"{r['decode_sparsity']:9.3f}")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version, "commit": commit_of(args.commit),
            "model": args.model, "dtype": str(dtype).removeprefix("torch."),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "commit", "fixed")},
            "task": dataclasses.asdict(task_cfg), "eval_max_tokens": rc.eval_max_tokens,
            "contexts": {"lengths": lengths, "count": len(contexts), "prompt_uids": [p.uid for p in seed_problems]},
            "seconds": time.perf_counter() - t_start}
    result = {"meta": meta, "settings": settings, "kl": kl_rows, "accuracy": accuracy_rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {triton_version}  commit {meta['commit']}  "
          f"{meta['seconds']:.0f} s\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
