"""Decode throughput of the native engine vs HF `generate`, and the bandwidth floor (GPU).

    python benchmarks/engine_decode.py --smollm2 PATH_TO_HF_DIR [--models ...] [--batches 1 8 64 256]

Per model and batch size: tokens/s of the engine and of HF `generate` (same prompts, EOS ignored,
greedy; HF is timed on its first --hf-new-tokens tokens, which only flatters it), and the floor: one decode step must at least read
the weights and the KV cache once, so floor_tokens_per_s = batch / ((weight bytes + mean KV bytes
per step) / measured device-to-device copy bandwidth). Random weights for the Qwen2.5 shapes
(throughput depends on shapes, not values); the real SmolLM2-135M-Instruct when a path is given.
Per model also a prefill row: the engine's prefill (+ one sampled token) vs the HF forward with
SDPA attention (logits of the last position only). Writes benchmarks/results/engine_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

QWEN_SHAPES = {  # Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate, vocab, tied)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
}


PROFILE = False


def copy_bandwidth(device) -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write


def hf_model(name: str, smollm2: str | None, device):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if name == "smollm2-135m":
        return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).to(device).eval()
    h, layers, heads, kv, inter, vocab, tied = QWEN_SHAPES[name]
    cfg = Qwen2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
                      max_position_embeddings=4096)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    model.generate(prompts[:, :8], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                                                                       eos_token_id=None, pad_token_id=0))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompts, generation_config=gen)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def kv_bytes_per_token(decoder) -> int:
    c = decoder.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * decoder.embed.weight.element_size()


def kv_cache_gb(decoder, tokens: int) -> float:
    """A cache that holds `tokens` tokens with room to spare: the decode rows must not preempt."""
    return max(1.0, 1.1 * tokens * kv_bytes_per_token(decoder) / 2**30 + 0.25)


def time_engine(decoder, prompts: torch.Tensor, new_tokens: int, decode_steps: int = 4,
                repeats: int = 1) -> tuple[list[float], int]:
    """Seconds of each of `repeats` timed runs of the engine over `prompts` (after one warm-up), and
    the preemptions of the timed runs."""
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    batch, plen = prompts.shape
    max_len = plen + new_tokens + 16
    cfg = EngineConfig(block_size=16, kv_cache_gb=kv_cache_gb(decoder, batch * max_len), max_num_seqs=max(batch, 1),
                       max_num_batched_tokens=max(8192, batch * plen), max_model_len=max_len,
                       decode_steps=decode_steps)
    engine = Engine(decoder, eos_token_ids=[], cfg=cfg)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    reqs = [Request(p.tolist(), params, str(i), str(i)) for i, p in enumerate(prompts)]
    # warm-up at the same batch size: compiles the kernels and captures the decode graph of its bucket
    engine.generate([Request(r.prompt_ids, SamplingParams(temperature=0.0, max_tokens=4), "w", "w") for r in reqs])
    times = []
    preempted_before = engine.stats["preemptions"]
    for _ in range(repeats):
        engine.block_manager.reset_prefix_cache()  # a timed run prefills its prompts in full
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if PROFILE:  # where the host time of a decode step goes
            import cProfile
            import pstats

            with cProfile.Profile() as prof:
                engine.generate(reqs)
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
        else:
            engine.generate(reqs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, engine.stats["preemptions"] - preempted_before


def time_prefill(model, decoder, prompts: torch.Tensor) -> tuple[float, float]:
    """Seconds to prefill `prompts` (and sample one token): the engine vs the HF forward with SDPA."""
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    batch, plen = prompts.shape
    engine = Engine(decoder, eos_token_ids=[], cfg=EngineConfig(block_size=16, kv_cache_gb=kv_cache_gb(decoder, batch * (plen + 16)),
                                                                max_num_seqs=batch,
                                                                max_num_batched_tokens=batch * plen,
                                                                max_model_len=plen + 16, enable_prefix_sharing=False))
    reqs = [Request(p.tolist(), SamplingParams(temperature=0.0, max_tokens=1), str(i), str(i))
            for i, p in enumerate(prompts)]
    times = []
    for fn in (lambda: engine.generate(reqs), lambda: model(prompts, logits_to_keep=1)):
        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 3)
    return times[0], times[1]


def write_results(out: str, bw: float, rows: list, prefill_rows: list) -> None:
    import transformers
    import triton

    from benchmarks.longtail import commit_of  # --commit-less: SLIPSTREAM_COMMIT or git

    meta = {"device": torch.cuda.get_device_name(), "copy_bandwidth_bytes_per_s": bw, "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__, "commit": commit_of(None),
            "pdl": os.environ.get("SLIPSTREAM_PDL", "1") != "0"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows, "prefill": prefill_rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help="HF directory of SmolLM2-135M-Instruct (real weights)")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--hf-new-tokens", type=int, default=64,
                    help="HF generate is timed on this many new tokens (its per-token rate only drops with length)")
    ap.add_argument("--prefill", nargs=2, type=int, default=[8, 1024], metavar=("BATCH", "PROMPT"))
    ap.add_argument("--skip-hf-above", type=int, default=10**9, help="skip the HF baseline for larger batches")
    ap.add_argument("--out", default="benchmarks/results/engine_decode.json")
    ap.add_argument("--decode-steps", type=int, default=4, help="rollout.decode_steps of the engine")
    ap.add_argument("--profile", action="store_true", help="print the host profile of each engine run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed engine runs per row: the row reports their median, and lists them all")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile

    from slipstream.models.weights import decoder_from_hf_module

    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    rows, prefill_rows = [], []
    for name in args.models:
        if name == "smollm2-135m" and not args.smollm2:
            continue
        model = hf_model(name, args.smollm2, device)
        decoder = decoder_from_hf_module(model, dtype=torch.bfloat16, device=device)
        c = decoder.config
        weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(10, c.vocab_size - 10, (batch, args.prompt), generator=g).to(device)
            runs, preemptions = time_engine(decoder, prompts, args.new_tokens, args.decode_steps, args.repeats)
            ours = statistics.median(runs)
            hf_tokens = min(args.hf_new_tokens, args.new_tokens)
            theirs = time_hf(model, prompts, hf_tokens) if batch <= args.skip_hf_above else None
            mean_ctx = args.prompt + args.new_tokens / 2
            kv_bytes = batch * mean_ctx * kv_bytes_per_token(decoder)
            floor = batch / ((weight_bytes + kv_bytes) / bw)
            tokens = batch * args.new_tokens
            row = {"model": name, "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
                   "decode_steps": args.decode_steps, "preemptions": preemptions,
                   "tokens_per_s": tokens / ours, "tokens_per_s_runs": [tokens / t for t in runs],
                   "hf_tokens_per_s": batch * hf_tokens / theirs if theirs else None,
                   "hf_new_tokens": hf_tokens,
                   "floor_tokens_per_s": floor, "device": torch.cuda.get_device_name()}
            row["fraction_of_floor"] = row["tokens_per_s"] / floor
            row["speedup_vs_hf"] = row["tokens_per_s"] / row["hf_tokens_per_s"] if theirs else None
            rows.append(row)
            print(f"{name:14s} b={batch:<4d} engine {row['tokens_per_s']:9.0f} tok/s  "
                  f"hf {row['hf_tokens_per_s'] or float('nan'):9.0f}  floor {floor:9.0f}  "
                  f"({100 * row['fraction_of_floor']:.1f}% of floor, "
                  f"{row['speedup_vs_hf'] or float('nan'):.1f}x hf)", flush=True)
        pb, pl = args.prefill
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(10, c.vocab_size - 10, (pb, pl), generator=g).to(device)
        ours, sdpa = time_prefill(model, decoder, prompts)
        prefill_rows.append({"model": name, "batch": pb, "prompt": pl, "tokens_per_s": pb * pl / ours,
                             "hf_sdpa_tokens_per_s": pb * pl / sdpa, "speedup_vs_hf_sdpa": sdpa / ours,
                             "device": torch.cuda.get_device_name()})
        print(f"{name:14s} prefill {pb}x{pl}: engine {pb * pl / ours:9.0f} tok/s  HF+SDPA {pb * pl / sdpa:9.0f} "
              f"({sdpa / ours:.2f}x)", flush=True)
        del model, decoder
        torch.cuda.empty_cache()
        write_results(args.out, bw, rows, prefill_rows)  # after every model: a cut-off run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
