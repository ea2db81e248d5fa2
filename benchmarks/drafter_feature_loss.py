"""Where the drafter's feature loss is computed: on the raw residual stream, or after the final norm.

    python benchmarks/drafter_feature_loss.py --model /tmp/smollm2-hf --device cpu --commit SHA

The target (SmolLM2-135M-Instruct by default: real weights) samples `--samples` answers to
`--train-prompts` task prompts and, as held-out data, to `--heldout-prompts` other prompts, its
last-layer features captured by the engine as in a run. Two drafters start from the same weights
and train `--steps` steps on the same batches, one with slipstream's loss (SmoothL1 on the
features after the target's final norm), one with the same loss on the raw residual stream (what
`drafter_loss` computed before). Every `--eval-every` steps, on the held-out pairs (teacher
forced, one step ahead): how often the drafter's top token is the target's, KL(target ||
drafter), and the probability that one token drawn from the drafter is accepted by speculative
sampling against the target (sum over tokens of min(p, q)). Writes
benchmarks/results/drafter_feature_loss.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.longtail import commit_of  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-prompts", type=int, default=24)
    p.add_argument("--heldout-prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drafter_feature_loss.json"))
    return p.parse_args(argv)


def raw_feature_loss(drafter, batch):
    """The baseline: `drafter_loss` with SmoothL1 on the raw residual stream."""
    cfg = drafter.config
    predicted = drafter(batch.features, batch.next_tokens, batch.positions, batch.segment_ids)[batch.valid]
    target = batch.target_features[batch.valid].to(predicted.dtype)
    feature_loss = F.smooth_l1_loss(predicted, target)
    with torch.no_grad():
        target_logp = drafter.logits(target).log_softmax(-1)
    logq = drafter.logits(predicted).log_softmax(-1)
    token_kl = (target_logp.exp() * (target_logp - logq)).sum(-1).mean()
    loss = cfg.feature_loss_weight * feature_loss + cfg.token_loss_weight * token_kl
    return loss, {"loss": loss.detach(), "feature_loss": feature_loss.detach(), "token_kl": token_kl.detach(),
                  "top1": (logq.argmax(-1) == target_logp.argmax(-1)).float().mean()}


@torch.no_grad()
def evaluate(drafter, batches) -> dict:
    drafter.eval()
    top1, kl, accept = [], [], []
    for b in batches:
        predicted = drafter(b.features, b.next_tokens, b.positions, b.segment_ids)[b.valid]
        p = drafter.logits(b.target_features[b.valid]).softmax(-1)
        logq = drafter.logits(predicted).log_softmax(-1)
        top1.append((logq.argmax(-1) == p.argmax(-1)).float().mean())
        kl.append((p * (p.clamp_min(1e-30).log() - logq)).sum(-1).mean())
        accept.append(torch.minimum(p, logq.exp()).sum(-1).mean())
    drafter.train()
    return {"top1": float(torch.stack(top1).mean()), "kl": float(torch.stack(kl).mean()),
            "accept_prob": float(torch.stack(accept).mean())}


def main(argv=None) -> int:
    args = parse_args(argv)
    from slipstream.config import compose
    from slipstream.drafter import bubble_trainer
    from slipstream.drafter.config import DrafterConfig
    from slipstream.drafter.feature_buffer import FeatureBuffer
    from slipstream.drafter.model import Drafter, TargetHead
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams
    from slipstream.tasks import build_task
    from slipstream.trainer.rl_loop import encode_prompt

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = compose(["recipe=smollm2-gpu", f"model.name={args.model}", f"trainer.device={device.type}"])
    model, tok = load_model_and_tokenizer(dataclasses.replace(cfg.model, dtype="float32"), device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    decoder = decoder_from_hf_module(model, dtype=dtype, device=device)
    del model
    dcfg = DrafterConfig(batch_tokens=args.batch_tokens, buffer_max_age=1_000_000)
    problems = build_task(cfg.task).train_problems()

    def collect(chosen, seed):
        buffer = FeatureBuffer(dcfg, decoder.config.hidden_size, dtype, device)
        engine = Engine(decoder, [tok.eos_token_id], EngineConfig(kv_cache_gb=1.0, max_num_seqs=128), seed=seed,
                        capture_layers=(dcfg.capture_layer,), feature_sink=buffer)
        params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
        t0 = time.perf_counter()
        comps = engine.generate([Request(encode_prompt(tok, q, cfg.task.system_prompt), params, q.uid, q.uid)
                                 for q in chosen])
        tokens = sum(len(c.tokens) for c in comps)
        print(f"generated {len(comps)} answers, {tokens} tokens, in {time.perf_counter() - t0:.0f} s", flush=True)
        return buffer, tokens

    train_buffer, train_tokens = collect(problems[: args.train_prompts], 1)
    held_buffer, held_tokens = collect(problems[-args.heldout_prompts:], 2)
    held = [held_buffer.sample(torch.Generator().manual_seed(i), device=device) for i in range(args.eval_batches)]
    head = TargetHead.from_decoder(decoder)

    runs = {}
    normed_loss = bubble_trainer.drafter_loss
    for name, loss_fn in (("raw", raw_feature_loss), ("normed", normed_loss)):
        bubble_trainer.drafter_loss = loss_fn  # the trainer's loss for this run
        try:
            torch.manual_seed(0)
            drafter = Drafter(decoder.config, head, dcfg, device=device)
            trainer = bubble_trainer.BubbleTrainer(drafter, train_buffer)
            rows, t0 = [], time.perf_counter()
            for step in range(1, args.steps + 1):
                trainer.train_step()
                if step % args.eval_every == 0 or step == args.steps:
                    row = {"step": step, "train_loss": float(trainer.last_stats["loss"]),
                           "train_feature_loss": float(trainer.last_stats["feature_loss"]),
                           **evaluate(drafter, held), "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    print(f"{name:6s} step {step:4d}: held-out top-1 {row['top1']:.3f}, KL {row['kl']:.3f}, "
                          f"P(accept) {row['accept_prob']:.3f} (train loss {row['train_loss']:.3f}, "
                          f"{row['seconds']:.0f} s)", flush=True)
            runs[name] = rows
        finally:
            bubble_trainer.drafter_loss = normed_loss

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "commit": commit_of(args.commit), "model": args.model,
            "train_tokens": train_tokens, "heldout_tokens": held_tokens, "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    last = {k: v[-1] for k, v in runs.items()}
    print(f"\nafter {args.steps} steps: held-out top-1 raw {last['raw']['top1']:.3f} vs normed "
          f"{last['normed']['top1']:.3f}; P(accept) {last['raw']['accept_prob']:.3f} vs "
          f"{last['normed']['accept_prob']:.3f}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
