"""Does a drafter trained online keep up with a drifting policy? An offline replay of an RL run's checkpoints.

    slipstream train recipe=... trainer.save_every=1 trainer.keep_checkpoints=100   # the run
    python benchmarks/drafter_replay.py --run-dir runs/NAME --commit SHA                # GPU
    python benchmarks/drafter_replay.py --run-dir /tmp/smoke --device cpu --prompts 2 --samples 2 \\
        --max-tokens 16 --kv-cache-gb 0.1 --warmup-steps 20 --bubble-steps 10 --out /tmp/drafter_replay.json

For the run's initial policy and then every kept checkpoint (one per RL step), in order: the
policy samples `--samples` completions of each of `--prompts` task prompts (the engine's feature
capture feeding the drafter's buffer, as in training); two drafters draft at `--cuts` random
cut points of every completion and the target verifies (`verify_drafts` with the drafter's q, at
the rollout temperature; the target's logits come from the policy's own forward):

* frozen: warmed up once on the initial policy's rollouts (`--warmup-steps`), then never trained;
* online: the same warm start, then `--bubble-steps` training steps after each rollout, on the
  buffer of the last `buffer_max_age` steps: what the bubbles of that step give it.

Each policy version is measured before the online drafter trains on its rollouts, as in a run
(step t drafts with a drafter that has seen data up to step t-1). Per version: acceptance length
(accepted drafts per verification of `--draft-len` drafts) and rate for both drafters, and the
online drafter's loss. Writes benchmarks/results/drafter_replay.json.

Rollout makespan with the learned drafter speculating inside the engine, during a real GRPO run,
is measured by benchmarks/drafter_online.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.longtail import commit_of  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="an RL run directory with one checkpoint per step")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--cuts", type=int, default=4, help="cut points measured per completion")
    p.add_argument("--draft-len", type=int, default=6)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--bubble-steps", type=int, default=100, help="online training steps after each rollout")
    p.add_argument("--kv-cache-gb", type=float, default=8.0)
    p.add_argument("--commit", default=None,
                   help="commit to record (default: $SLIPSTREAM_COMMIT, else git rev-parse of this checkout)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drafter_replay.json"))
    args = p.parse_args(argv)
    for name in ("prompts", "samples", "max_tokens", "cuts", "draft_len", "warmup_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu for a small check)")
    return args


class Recorder:
    """Feature sink: every captured row of the step's sequences, by sequence and position (host)."""

    def __init__(self, layer: int):
        self.layer = layer
        self.rows: dict[tuple, dict[int, tuple[torch.Tensor, int]]] = {}

    def __call__(self, sf) -> None:
        h = sf.hidden[self.layer].float().cpu()
        owner, pos, tok = sf.owner.tolist(), sf.positions.tolist(), sf.token_ids.tolist()
        for r in range(h.shape[0]):
            self.rows.setdefault(sf.seq_keys[owner[r]], {})[pos[r]] = (h[r], tok[r])


def measure(drafters: dict, model, recorder: Recorder, completions, keys, args, temperature: float, seed: int):
    """Acceptance of each drafter at random cut points of the completions (see the module docstring)."""
    from slipstream.drafter import DraftContext
    from slipstream.rollout.spec.verify import verify_drafts

    gen = torch.Generator().manual_seed(seed)
    contexts, chains_prefix = [], []
    for key, c in zip(keys, completions):
        rows = recorder.rows.get(key, {})
        ids = c.prompt_ids + c.tokens
        P = len(c.prompt_ids)
        if len(c.tokens) < 2 or not rows:
            continue
        first = min(rows)
        for n in torch.randint(max(P, first + 1), len(ids), (args.cuts,), generator=gen).tolist():
            # features h_first..h_{n-1}, tokens x_first..x_n
            feats = torch.stack([rows[p][0] for p in range(first, n)])
            contexts.append((feats, torch.tensor(ids[first:n + 1]), first))
            chains_prefix.append(ids[:n + 1])
    if not contexts:
        return {}
    device = next(model.parameters()).device
    out = {}
    for name, drafter in drafters.items():
        ctx = DraftContext.from_sequences([(f.to(device), t.to(device), a) for f, t, a in contexts],
                                          drafter.config.window)
        B, k = len(contexts), args.draft_len
        temp = torch.full((B,), temperature, device=device)
        draft = drafter.draft(ctx, k, temp, generator=torch.Generator(device).manual_seed(seed))
        logits = []
        with torch.no_grad():
            for b, prefix in enumerate(chains_prefix):  # the target at x_n, d_1 .. d_k
                ids = torch.tensor([prefix + draft.tokens[b].tolist()], device=device)
                logits.append(model(ids).logits[0, len(prefix) - 1:].float())
        res = verify_drafts(torch.stack(logits), draft.tokens, torch.full((B,), k, device=device), temp,
                            torch.ones(B, device=device), torch.zeros(B, dtype=torch.long, device=device),
                            draft_probs=draft.probs, generator=torch.Generator(device).manual_seed(seed + 1))
        accepted = res.accepted_lens.float()
        out[name] = {"acceptance_len": float(accepted.mean()), "acceptance_rate": float(accepted.mean() / k),
                     "verifications": B}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import dataclasses

    from omegaconf import OmegaConf

    from slipstream.config import LearnedDrafterConfig, ModelConfig, TaskConfig, drafter_config
    from slipstream.drafter import BubbleTrainer, Drafter, FeatureBuffer, TargetHead
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams
    from slipstream.tasks import build_task
    from slipstream.trainer.checkpoint import MARKER
    from slipstream.trainer.export import actor_state_dict
    from slipstream.trainer.rl_loop import encode_prompt

    run_dir = Path(args.run_dir)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    model_cfg = ModelConfig(**OmegaConf.to_container(run_cfg.model))
    model_cfg = dataclasses.replace(model_cfg, dtype="float32")
    task_cfg = TaskConfig(**OmegaConf.to_container(run_cfg.task))
    dcfg = drafter_config(LearnedDrafterConfig(**OmegaConf.to_container(run_cfg.get("drafter", {}))))
    temperature = float(run_cfg.rollout.temperature)
    checkpoints = sorted((int(p.name.split("_")[1]), p) for p in (run_dir / "checkpoints").glob("step_*")
                         if (p / MARKER).is_file())
    if not checkpoints:
        raise SystemExit(f"{run_dir} has no complete checkpoint: train with trainer.save_every=1 and "
                         f"trainer.keep_checkpoints >= the number of steps")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model_and_tokenizer(model_cfg, device)
    model.eval()
    problems = build_task(task_cfg).train_problems()[:args.prompts]
    prompts = {p.uid: encode_prompt(tokenizer, p, task_cfg.system_prompt) for p in problems}

    versions = [(0, None)] + checkpoints
    buffer = frozen = online = trainer = None
    steps = []
    for step, ckpt in versions:
        if ckpt is not None:
            model.load_state_dict(actor_state_dict(ckpt / "actor", model), strict=False)
        decoder = decoder_from_hf_module(model, dtype=dtype, device=device)
        if buffer is None:
            buffer = FeatureBuffer(dcfg, decoder.config.hidden_size, dtype, device)
        buffer.set_step(step)
        recorder = Recorder(dcfg.capture_layer)

        def sink(sf, recorder=recorder):
            buffer(sf)
            recorder(sf)

        ecfg = EngineConfig(block_size=16, kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.prompts * args.samples,
                            max_model_len=max(len(p) for p in prompts.values()) + args.max_tokens + 1)
        engine = Engine(decoder, [tokenizer.eos_token_id], ecfg, seed=step, capture_layers=(dcfg.capture_layer,),
                        feature_sink=sink)
        params = SamplingParams(n=args.samples, temperature=temperature, max_tokens=args.max_tokens, seed=step)
        requests = [Request(ids, params, uid, f"{step}-{uid}") for uid, ids in prompts.items()]
        t0 = time.perf_counter()
        completions = engine.generate(requests)
        rollout_s = time.perf_counter() - t0
        keys = [(c.request_id, i % args.samples) for i, c in enumerate(completions)]

        head = TargetHead.from_decoder(decoder)
        if trainer is None:  # warm start on the initial policy
            online = Drafter(decoder.config, head, dcfg, device=device)
            trainer = BubbleTrainer(online, buffer)
            trainer.train_until(max_steps=args.warmup_steps, kind="warmup")
            frozen = online.replica()
        # Both drafters read out through this policy's head (the embedding and head drift too).
        online.head = frozen.head = head
        row = {"step": step, "rollout_s": rollout_s, "tokens": sum(len(c.tokens) for c in completions)}
        row.update(measure({"frozen": frozen, "online": online}, model, recorder, completions, keys, args,
                           temperature, seed=step))
        if step > 0:  # the bubbles after this step's rollout
            trainer.train_until(max_steps=args.bubble_steps, kind="rank_idle")
        row["drafter"] = trainer.log(step)
        steps.append(row)
        print(f"step {step:3d}: frozen accept_len {row.get('frozen', {}).get('acceptance_len', 0):.2f}  "
              f"online {row.get('online', {}).get('acceptance_len', 0):.2f}  "
              f"loss {row['drafter'].get('drafter/loss', float('nan')):.4f}", flush=True)

    online_lens = [r["online"]["acceptance_len"] for r in steps if "online" in r]
    frozen_lens = [r["frozen"]["acceptance_len"] for r in steps if "frozen" in r]
    result = {
        "benchmark": "drafter_replay",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": commit_of(args.commit),
        "run_dir": str(run_dir),
        "model": model_cfg.name,
        "args": vars(args),
        "drafter_config": dataclasses.asdict(dcfg),
        "steps": steps,
        "summary": {
            # the targets: online within 10% of its best step; frozen decays
            "online_last_over_best": online_lens[-1] / max(online_lens) if online_lens and max(online_lens) else None,
            "frozen_last_over_first": frozen_lens[-1] / frozen_lens[0] if frozen_lens and frozen_lens[0] else None,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
