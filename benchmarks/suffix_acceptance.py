"""How often the target accepts a suffix-tree draft's first token: the tree's most frequent token
(what the engine drafts) against a token drawn from the tree's counts (a drafter distribution q).

    python benchmarks/suffix_acceptance.py --model /tmp/smollm2-hf --device cpu --out FILE

At temperature 1 lossless verification accepts a deterministic draft token x with probability
p(x), and a token drawn from q with probability sum_x min(p(x), q(x)). The suffix trees count the
continuations of earlier rollouts of the same prompt, which are samples of (nearly) the same
policy, so their counts estimate p; this measures whether drafting from them would be accepted
more often than drafting their mode.

The long-tail workload's arithmetic prompts are rolled out `--rounds` times with the native
engine (no speculation, temperature 1, `--samples` per prompt); the first rounds fill the
prompts' windows. The last round is replayed through a `SuffixDrafter` in lockstep, as the
engine would see it live: at every position t each sample has its own first t tokens and its
siblings theirs. At each position where the drafter proposes, with its source's tree, the script
reads the first draft token x* and the counts q of the tokens that followed the matched suffix;
the target's p at that position comes from a teacher-forced forward of the sampled sequence.
Prints and writes, over those positions: mean p(x*) and mean sum_x min(p, q), and the fraction
of positions that had a draft; for scale, the mean of max_x p(x), what a deterministic drafter
that knew the target's mode would get, over the drafted positions and over all of them.
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

from benchmarks.longtail import commit_of, workload  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF directory (SmolLM2-135M-Instruct) or a registered name")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=4, help="the last one is measured, the others fill the windows")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suffix_acceptance.json"))
    return p.parse_args(argv)


def target_probs(model, prompt: list[int], output: list[int], temperature: float, device) -> torch.Tensor:
    """[len(output), vocab]: the target's distribution of each output token, teacher-forced."""
    ids = torch.tensor([prompt + output], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:len(prompt) + len(output) - 1].float()
    return (logits / temperature).softmax(-1).cpu()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from slipstream.config import compose
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.spec.suffix_tree import SuffixDrafter
    from slipstream.rollout.types import Request, SamplingParams

    device = torch.device(args.device)
    cfg = compose([f"model.name={args.model}", "model.dtype=float32", f"trainer.device={device.type}"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    model.eval()
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                     device=device)
    _, _, prompts = workload(tokenizer, args.prompts)
    longest = max(len(ids) for ids in prompts.values())
    engine = Engine(decoder, [tokenizer.eos_token_id],
                    EngineConfig(block_size=16, kv_cache_gb=1.0, max_num_seqs=args.prompts * args.samples,
                                 max_model_len=longest + args.max_tokens + 1), seed=0)
    drafter = SuffixDrafter()
    t0 = time.perf_counter()
    for r in range(args.rounds):
        params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=r)
        completions = engine.generate([Request(ids, params, uid, f"{r}-{uid}") for uid, ids in prompts.items()])
        print(f"round {r}: {sum(len(c.tokens) for c in completions)} tokens "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if r < args.rounds - 1:
            for c in completions:
                drafter.add_rollout(c.group_id, c.tokens)
            drafter.end_step()

    groups: dict[str, list] = {}
    for c in completions:
        groups.setdefault(c.group_id, []).append(c)
    positions = drafted = 0
    mode_accept = dist_accept = oracle_all = oracle_drafted = 0.0
    by_source: dict[str, list[float]] = {}
    for gid, comps in groups.items():
        probs = [target_probs(model, list(c.prompt_ids), list(c.tokens), args.temperature, device) for c in comps]
        for i, c in enumerate(comps):
            drafter.add_request(i, gid, c.prompt_ids)
        for t in range(max(len(c.tokens) for c in comps)):
            for i, c in enumerate(comps):
                if t >= len(c.tokens):
                    continue
                positions += 1
                context = list(c.prompt_ids) + list(c.tokens[:t])
                draft = drafter.propose(i, gid, context, 1)
                best = float(probs[i][t].max())  # what a drafter that knew p's mode would get
                oracle_all += best
                if draft.tokens:
                    oracle_drafted += best
                    tree = drafter.sources(i, gid)[draft.source]
                    counts = tree.continuations(context[len(context) - draft.match_len:])
                    total = sum(counts.values())
                    if not total:  # a match as long as the tree's depth: its draft goes on from a shorter one
                        counts, total = {draft.tokens[0]: 1}, 1
                    p = probs[i][t]
                    a_mode = float(p[draft.tokens[0]])
                    a_dist = sum(min(float(p[tok]), n / total) for tok, n in counts.items())
                    drafted += 1
                    mode_accept += a_mode
                    dist_accept += a_dist
                    s = by_source.setdefault(draft.source, [0, 0.0, 0.0])
                    s[0] += 1
                    s[1] += a_mode
                    s[2] += a_dist
            for i, c in enumerate(comps):  # every sample's token t is now known to the trees
                if t < len(c.tokens):
                    drafter.update(i, [c.tokens[t]])
        for i in range(len(comps)):
            drafter.finish_request(i)
    drafter.end_step()

    summary = {
        "positions": positions, "drafted_fraction": drafted / max(positions, 1),
        "first_token_accept_mode": mode_accept / max(drafted, 1),
        "first_token_accept_counts": dist_accept / max(drafted, 1),
        "first_token_accept_target_mode": oracle_drafted / max(drafted, 1),
        "first_token_accept_target_mode_all_positions": oracle_all / max(positions, 1),
        "by_source": {k: {"drafts": n, "accept_mode": m / n, "accept_counts": d / n}
                      for k, (n, m, d) in by_source.items()},
    }
    print(json.dumps(summary, indent=2))
    import transformers

    meta = {"benchmark": "suffix_acceptance", "device": torch.cuda.get_device_name() if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit_of(args.commit), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary}, indent=2))
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
