"""Rollout makespan during real GRPO: no speculation, the suffix tree, the learned drafter frozen
and online, and both composed, on the long-tail workload.

    python benchmarks/drafter_online.py --model /tmp/smollm2-hf --commit SHA                 # GPU (H200: ~8 min)
    python benchmarks/drafter_online.py --model /tmp/smollm2-hf --quick --commit SHA         # GPU, shorter
    python benchmarks/drafter_online.py --device cpu --model tiny-random --steps 2 --prompts 2 --samples 2 \\
        --max-tokens 24 --kv-cache-gb 0.05 --warmup-steps 10 --drafter-steps 5 --out /tmp/drafter_online.json

GRPO on SmolLM2-135M-Instruct over the long-tail workload of benchmarks/longtail.py (its
arithmetic prompts, the same ones every step, temperature 1.0, long max_tokens), `--steps` RL
steps so the policy drifts. Five engines share the policy's weights (one decoder, weights synced
after every update), each with its own KV cache and its own speculation state:

* off: no speculation;  suffix: spec=suffix (the suffix tree over its own earlier rollouts);
* drafter-frozen: spec=drafter with the warm-start drafter, never trained;
* drafter-online: spec=drafter with the drafter trained online;
* both: spec=both, the suffix tree and the online drafter composed (the source policy picks
  none / suffix / drafter / both per live-batch bucket, "both" the better draft per request).

Before step 1, every engine rolls the prompts out once, untimed and without history (kernels
compiled, CUDA graphs of every batch size captured; the learned drafter's chain graphs are
captured when the drafters are built); then the warm start: the initial policy samples the
prompts once more (feature capture into the drafter's buffer), and the drafter trains
`--warmup-steps` steps; frozen and online start from those weights. Each step, before the
update, every mode rolls out the same prompts with the same sampling seed, in an order rotated
every step; the timed rollouts are the makespans compared (the wall clock of `Engine.generate`,
as in longtail.py). The training rollout is the `--train-on` mode's (both by default): its
completions make the GRPO batch and its features feed the online drafter's buffer. Between the
rollouts and the update the online drafter trains `--drafter-steps` steps (the step's bubbles;
their time is reported apart, not in any makespan) and its new weights swap in for the next
step; the side stream is off, so no makespan includes training. Per step and mode: makespan,
tokens, tokens/s, acceptance length overall and per draft source, time with fewer than 16 live
sequences; per step: reward, the drafter's loss and training time, and both drafters' expected
acceptance on the same batch of the step's training rollout before the online one trains on it
(`rollout_accept`: the probability that a first draft token is accepted, whatever the policies
chose to draft; the issue's drafter targets are read from it). Writes
benchmarks/results/drafter_online.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.longtail import SMALL_BATCH, commit_of, spec_option, sync, timed_rollout, workload  # noqa: E402

MODES = ("off", "suffix", "drafter-frozen", "drafter-online", "both")
QUICK = {"steps": 10, "prompts": 16, "samples": 8, "max_tokens": 512, "warmup_steps": 200, "drafter_steps": 60}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF directory (SmolLM2-135M-Instruct) or a registered name")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--steps", type=int, default=10, help="GRPO steps")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5, help="the policy's learning rate")
    p.add_argument("--warmup-steps", type=int, default=400, help="drafter training steps of the warm start")
    p.add_argument("--drafter-steps", type=int, default=100, help="online drafter training steps per RL step")
    p.add_argument("--drafter-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the drafter's keys (drafter.* of the config), e.g. lr=1e-3 window=32")
    p.add_argument("--spec-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the spec options' keys (all modes), e.g. min_batch_for_off=64")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--train-on", default="both", choices=MODES, help="the mode whose rollout trains the policy")
    p.add_argument("--kv-cache-gb", type=float, default=6.0, help="KV cache of each engine")
    p.add_argument("--no-drafter-graphs", action="store_true",
                   help="draft with the learned drafter eagerly (default on GPU: CUDA graphs of its chain)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--quick", action="store_true",
                   help=f"a shorter run: {', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in QUICK.items())} "
                        "(options given on the command line win)")
    p.add_argument("--commit", default=None,
                   help="commit to record (default: $SLIPSTREAM_COMMIT, else git rev-parse of this checkout)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drafter_online.json"))
    args = p.parse_args(argv)
    if args.quick:  # its settings, except those given on the command line
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(args, k, v)
    for name in ("steps", "prompts", "samples", "max_tokens", "warmup_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < 2:
        p.error("--samples must be >= 2 (GRPO normalises advantages within a group)")
    if args.train_on not in args.modes:
        p.error(f"--train-on {args.train_on} is not among --modes {args.modes}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu for a small check)")
    return args


def drafter_settings(overrides: list[str]):
    """`DrafterConfig` from the config's drafter defaults and KEY=VALUE overrides."""
    from omegaconf import OmegaConf

    from slipstream.config import LearnedDrafterConfig, drafter_config

    merged = OmegaConf.merge(OmegaConf.structured(LearnedDrafterConfig), OmegaConf.from_dotlist(overrides))
    return drafter_config(OmegaConf.to_object(merged))


def source_metrics(metrics: dict) -> dict:
    """Acceptance per draft source and the source policy's choices, from `Engine.rollout_metrics`."""
    keys = ("acceptance_len", "acceptance_rate", "drafted_tokens")
    out = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "spec" and parts[2] in keys:
            out.setdefault(parts[1], {})[parts[2]] = v
        elif k.startswith("spec/source_steps/"):
            out.setdefault("source_steps", {})[parts[2]] = v
    return out


def build_engines(args, decoder, tokenizer, dcfg, device):
    """The engines of the modes, and the frozen and online drafters."""
    from slipstream.config import engine_spec_config, source_policy_config
    from slipstream.drafter import RunDrafter
    from slipstream.rollout.engine import Engine, EngineConfig

    ecfg = EngineConfig(block_size=16, kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.prompts * args.samples,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.longest_prompt + args.max_tokens + 1)
    eos = [tokenizer.eos_token_id]
    graph_batch = min(args.prompts * args.samples, spec_option("drafter", args.spec_set).min_batch_for_off) \
        if device.type == "cuda" and not args.no_drafter_graphs else 0
    online = RunDrafter(decoder, dcfg, online=True, side_stream=False, max_seqs=args.prompts * args.samples,
                        graph_batch=graph_batch)
    frozen = RunDrafter(decoder, dcfg, online=False, max_seqs=args.prompts * args.samples, graph_batch=graph_batch)
    specs = {kind: spec_option(kind, args.spec_set) for kind in ("suffix", "drafter", "both")}
    builders = {
        "off": lambda: Engine(decoder, eos, ecfg, seed=0),
        "suffix": lambda: Engine(decoder, eos, ecfg, seed=0, spec=engine_spec_config(specs["suffix"])),
        "drafter-frozen": lambda: frozen.build_engine(decoder, eos, ecfg, 0, engine_spec_config(specs["drafter"]),
                                                      source_policy_config(specs["drafter"]), trains=False),
        "drafter-online": lambda: online.build_engine(decoder, eos, ecfg, 0, engine_spec_config(specs["drafter"]),
                                                      source_policy_config(specs["drafter"]),
                                                      trains=args.train_on == "drafter-online"),
        "both": lambda: online.build_engine(decoder, eos, ecfg, 0, engine_spec_config(specs["both"]),
                                            source_policy_config(specs["both"]), trains=args.train_on == "both"),
    }
    return {m: builders[m]() for m in args.modes}, frozen, online, ecfg, specs


def warm_start(online, frozen, decoder, tokenizer, ecfg, requests, steps: int, device) -> dict:
    """The initial policy's samples captured into the online drafter's buffer, `steps` training
    steps, and the frozen drafter given the same weights."""
    from slipstream.rollout.engine import Engine

    engine = Engine(decoder, [tokenizer.eos_token_id], ecfg, seed=0, capture_layers=(online.config.capture_layer,),
                    feature_sink=online.buffer)
    online.start_step(0)
    t0 = time.perf_counter()
    completions = engine.generate(requests)
    sync(device)
    generate_s = time.perf_counter() - t0
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    report = online.trainer.train_until(max_steps=steps, kind="warmup")
    online.publish()
    frozen.load_state_dict({"online": False, "drafter": online.drafter.state_dict()})
    return {"generate_s": generate_s, "train_s": time.perf_counter() - t0, "train_steps": report.steps,
            "tokens": sum(len(c.tokens) for c in completions), "pairs": online.buffer.num_pairs(),
            "loss": float(online.trainer.last_stats["loss"]) if online.trainer.last_stats else None}


def summarize(steps: list[dict], modes: list[str]) -> dict:
    """Mean makespan and speedup over off per mode; the online and frozen drafters' acceptance over the run."""
    out: dict = {"makespan_mean_s": {}, "speedup_vs_off_mean": {}, "acceptance_len": {}, "rollout_accept": {}}
    for m in modes:
        spans = [s["modes"][m]["makespan_s"] for s in steps]
        out["makespan_mean_s"][m] = statistics.mean(spans)
        if "off" in modes:
            out["speedup_vs_off_mean"][m] = statistics.mean(
                s["modes"]["off"]["makespan_s"] / s["modes"][m]["makespan_s"] for s in steps)
        lens = [s["modes"][m]["sources"].get("drafter", {}).get("acceptance_len") for s in steps]
        if any(v is not None for v in lens):
            out["acceptance_len"][m] = lens
    for m in ("drafter-online", "drafter-frozen"):
        out["rollout_accept"][m] = [s["rollout_accept"].get(m) for s in steps]
    # the targets: the online drafter within 10% of its best step, the frozen one decaying
    online = [v for v in out["rollout_accept"]["drafter-online"] if v is not None]
    if online and max(online) > 0:
        out["online_last_over_best"] = online[-1] / max(online)
    frozen = [v for v in out["rollout_accept"]["drafter-frozen"] if v is not None]
    if frozen and frozen[0] > 0:
        out["frozen_last_over_first"] = frozen[-1] / frozen[0]
    if {"off", "both"} <= set(modes):
        last = steps[-1]["modes"]
        out["both_speedup_last_step"] = last["off"]["makespan_s"] / last["both"]["makespan_s"]
        out["both_beats_each_drafter_alone"] = all(
            out["makespan_mean_s"]["both"] < out["makespan_mean_s"][m]
            for m in ("suffix", "drafter-online") if m in modes)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from slipstream.config import compose
    from slipstream.drafter.bubble_trainer import expected_acceptance
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.types import Request, SamplingParams
    from slipstream.trainer.batch import build_batch
    from slipstream.trainer.distributed import init_distributed
    from slipstream.trainer.parts import build_parts
    from slipstream.models import load_model_and_tokenizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = compose([f"model.name={args.model}", "model.dtype=float32", f"trainer.device={device.type}",
                   f"rollout.n={args.samples}", f"rollout.temperature={args.temperature}",
                   f"rollout.max_tokens={args.max_tokens}", f"trainer.lr={args.lr}", "trainer.micro_batch_size=16",
                   "logger.wandb=false", "logger.progress=false"])
    ctx = init_distributed(device.type, 1800.0, need_group=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                     device=device)
    actor = build_parts(cfg, model, ctx).actor
    task, problems, prompts = workload(tokenizer, args.prompts)
    by_uid = {p.uid: p for p in problems}
    args.longest_prompt = max(len(ids) for ids in prompts.values())
    dcfg = drafter_settings(args.drafter_set)
    engines, frozen, online, ecfg, specs = build_engines(args, decoder, tokenizer, dcfg, device)

    params0 = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    requests0 = [Request(ids, params0, uid, f"0-{uid}") for uid, ids in prompts.items()]
    t0 = time.perf_counter()
    for engine in engines.values():  # kernels compiled, graphs of every batch size captured: nothing timed
        engine.generate(requests0, history=False)
    print(f"untimed warm-up rollouts of {len(engines)} engines: {time.perf_counter() - t0:.1f} s", flush=True)
    warmup = warm_start(online, frozen, decoder, tokenizer, ecfg, requests0, args.warmup_steps, device)
    print(f"warm start: {warmup['tokens']} tokens, {warmup['pairs']} pairs, {warmup['train_steps']} steps "
          f"in {warmup['train_s']:.1f} s, loss {warmup['loss']}", flush=True)

    modes = list(engines)
    meta = run_meta(args, dcfg, specs, device)
    steps = []
    for step in range(1, args.steps + 1):
        params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=step)
        requests = [Request(ids, params, uid, f"{step}-{uid}") for uid, ids in prompts.items()]
        online.start_step(step)
        order = modes[step % len(modes):] + modes[:step % len(modes)]
        row = {"step": step, "order": order, "modes": {}}
        for mode in order:
            completions, measured = timed_rollout(engines[mode], requests, device)
            measured["sources"] = source_metrics(engines[mode].rollout_metrics(SMALL_BATCH))
            row["modes"][mode] = measured
            if mode == args.train_on:
                training = completions
        # both drafters on the same batch of this step's training rollout, before the online one trains on it
        held_out = online.buffer.sample(torch.Generator().manual_seed(step), step=step)
        row["rollout_accept"] = {} if held_out is None else {
            "drafter-online": expected_acceptance(online.drafter, held_out),
            "drafter-frozen": expected_acceptance(frozen.drafter, held_out)}
        # rewards, the drafter's bubble, the update, the weights into every engine
        texts = tokenizer.batch_decode([c.tokens for c in training], skip_special_tokens=True)
        rewards = [task.reward(by_uid[c.group_id], t) for c, t in zip(training, texts)]
        t0 = time.perf_counter()
        online.train_after_rollout(args.drafter_steps)
        online.publish()
        sync(device)
        row["drafter_train_s"] = time.perf_counter() - t0
        row["drafter"] = online.log(step)
        batch = build_batch(training, rewards, tokenizer.pad_token_id)
        t0 = time.perf_counter()
        update = actor.update(batch, actor.advantages(batch), step - 1, args.max_tokens)
        weights = list(actor.backend.named_full_parameters())
        for engine in engines.values():
            engine.load_weights(weights)
        row["update_s"] = time.perf_counter() - t0
        row["reward_mean"] = sum(rewards) / len(rewards)
        row["loss"] = update.get("loss")
        steps.append(row)
        spans = "  ".join(f"{m} {row['modes'][m]['makespan_s']:.2f}s"
                          f"/{row['modes'][m]['sources'].get('drafter', {}).get('acceptance_len', float('nan')):.2f}"
                          for m in modes)
        accept = "  ".join(f"{m} {v:.3f}" for m, v in row["rollout_accept"].items())
        print(f"step {step:2d} reward {row['reward_mean']:.3f}  makespan/drafter accept_len: {spans}  "
              f"drafter loss {row['drafter'].get('drafter/loss', float('nan')):.3f}  rollout accept: {accept}",
              flush=True)
        write_result(args, meta, steps, modes, warmup, final=False)

    result = write_result(args, meta, steps, modes, warmup, final=True)
    print(json.dumps(result["summary"], indent=2, default=list))
    print(f"wrote {args.out}")
    return result


def run_meta(args, dcfg, specs, device) -> dict:
    """Device, versions, commit and settings of the run."""
    import dataclasses

    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"benchmark": "drafter_online",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "commit": commit_of(args.commit), "model": args.model,
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "commit")},
            "drafter_config": dataclasses.asdict(dcfg), "spec": {k: v.__dict__ for k, v in specs.items()}}


def write_result(args, meta: dict, steps: list[dict], modes: list[str], warmup: dict, final: bool) -> dict:
    """The result file, rewritten after every step (a run cut short keeps the steps it finished)."""
    result = {"meta": {**meta, "complete": final, "steps_done": len(steps)},
              "summary": summarize(steps, modes) if steps else {}, "warm_start": warmup, "steps": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list) + "\n")
    return result


if __name__ == "__main__":
    main()
