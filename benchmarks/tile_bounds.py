"""Could a bound on a key tile's scores let skip-softmax decode skip the tile without reading its K?

Skip-softmax decode reads every K tile to take its maximum score, so at 70% of tiles skipped it
still reads 65% of the dense kernel's bytes. A per-tile upper bound of q . k computed from small
per-tile summaries of K (each channel's minimum and maximum over the tile's keys, as Quest does:
sum_d max(q_d * kmax_d, q_d * kmin_d)) would let a kernel skip a tile on the summary alone whenever
the bound already passes the skip test; the decisions stay exactly BLASST's (a bound that passes
implies the true maximum passes). This measures how many of BLASST's skipped tiles such a bound
would prove skippable, on a real model's queries and keys.

    python benchmarks/tile_bounds.py --model /path/to/SmolLM2-135M-Instruct [--tokens 4096] --commit SHA

Queries and keys (after rotary embedding) of every layer come from one forward of HF transformers
over `--tokens` tokens of this repository's docs/*.md. Each of `--queries` positions near the end
is a decode query over the keys before it, tiled like the decode kernel (`--block-n` keys, the
split-K parts of `split_bounds`, later parts seeded with key 0's score). The skip scale that reaches
`--target` sparsity is found by bisection; then, per `--bound-keys` (the summary's granularity; a
tile's bound is the maximum over its sub-blocks), the fraction of skipped tiles the bound proves.
Runs on the CPU; writes benchmarks/results/tile_bounds_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.attention import git_commit  # noqa: E402
from slipstream.kernels.sparse_reference import LOG2E, split_bounds  # noqa: E402


def capture_qk(model_dir: str, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (q [heads, L, D], k [kv_heads, L, D]) after rotary embedding, float32."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"docs/*.md hold only {ids.shape[1]} tokens, fewer than --tokens {tokens}")
    captured = []
    rotate = llama.apply_rotary_pos_emb

    def record(q, k, *args, **kwargs):
        q, k = rotate(q, k, *args, **kwargs)
        captured.append((q[0].float().clone(), k[0].float().clone()))
        return q, k

    llama.apply_rotary_pos_emb = record
    try:
        with torch.no_grad():
            model(ids)
    finally:
        llama.apply_rotary_pos_emb = rotate
    if len(captured) != model.config.num_hidden_layers:
        raise SystemExit(f"captured {len(captured)} layers of {model.config.num_hidden_layers}: not a Llama model?")
    return captured


def tile_stats(q, k, p, block_n, bound_keys, qk_scale):
    """Decode query at position p: per kv head, each tile's row maxima [KVH, R, tiles], each tile's
    bound per row [KVH, R, tiles] (base-2 units) and key 0's scores [KVH, R]."""
    kvh, dim = k.shape[0], k.shape[-1]
    ctx = p + 1
    n_tiles = -(-ctx // block_n)
    pad = n_tiles * block_n - ctx
    qq = q[:, p].view(kvh, -1, dim)  # [KVH, group, D]
    s = torch.einsum("hgd,hld->hgl", qq, k[:, :ctx]) * qk_scale
    m_tile = torch.nn.functional.pad(s, (0, pad), value=-math.inf).view(kvh, -1, n_tiles, block_n).amax(-1)
    keys = torch.nn.functional.pad(k[:, :ctx], (0, 0, 0, pad), value=math.nan)
    keys = keys.view(kvh, n_tiles * block_n // bound_keys, bound_keys, dim)
    kmax = keys.nan_to_num(nan=-math.inf).amax(2).nan_to_num(neginf=0.0)  # padding-only sub-blocks: 0
    kmin = keys.nan_to_num(nan=math.inf).amin(2).nan_to_num(posinf=0.0)
    bound = torch.maximum(qq[:, :, None] * kmax[:, None], qq[:, :, None] * kmin[:, None]).sum(-1) * qk_scale
    bound = bound.view(kvh, -1, n_tiles, block_n // bound_keys).amax(-1)
    return m_tile, bound, s[:, :, 0]


def walk(stats, skip_scale, num_splits):
    """BLASST's decode walk over precomputed stats -> (visited, skipped, skipped that the bound proves)."""
    visited = skipped = proved = 0
    for m_tile, bound, key0, ctx in stats:
        log2_lambda = math.log2(skip_scale / ctx)
        for begin, end in split_bounds(m_tile.shape[-1], num_splits, 1):
            m_run = key0.clone() if begin > 0 else torch.full_like(key0, -math.inf)
            for t in range(begin, end):
                visited += m_tile.shape[0]
                skip = (m_tile[..., t] < m_run + log2_lambda).all(-1)  # [KVH]
                skipped += int(skip.sum())
                proved += int((skip & (bound[..., t] < m_run + log2_lambda).all(-1)).sum())
                m_run = torch.where(skip[:, None], m_run, torch.maximum(m_run, m_tile[..., t]))
    return visited, skipped, proved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local HF directory of a Llama-architecture model")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--queries", type=int, default=12, help="decode query positions, spread over the last quarter")
    p.add_argument("--block-n", type=int, default=128, help="keys per tile (the skip kernel's 128)")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 8], help="split-K parts per sequence")
    p.add_argument("--bound-keys", type=int, nargs="+", default=[128, 32, 16])
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tile_bounds_cpu.json"))
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    layers = capture_qk(args.model, args.tokens)
    dim = layers[0][1].shape[-1]
    qk_scale = dim**-0.5 * LOG2E
    step = max(args.tokens // 4 // args.queries, 1)
    positions = [args.tokens - 1 - i * step for i in range(args.queries)]
    print(f"[{time.time() - t0:5.1f}s] {len(layers)} layers, queries at {positions[-1]}..{positions[0]}", flush=True)
    rows = []
    for bound_keys in args.bound_keys:
        if args.block_n % bound_keys:
            raise SystemExit(f"--bound-keys {bound_keys} must divide --block-n {args.block_n}")
        stats = [(*tile_stats(q, k, pos, args.block_n, bound_keys, qk_scale), pos + 1)
                 for q, k in layers for pos in positions]
        for num_splits in args.splits:
            lo, hi = 1e-4, 1e8  # sparsity grows with the scale
            for _ in range(30):
                mid = math.sqrt(lo * hi)
                v, s, _ = walk(stats, mid, num_splits)
                lo, hi = (mid, hi) if s / v < args.target else (lo, mid)
            visited, skipped, proved = walk(stats, hi, num_splits)
            row = dict(bound_keys=bound_keys, num_splits=num_splits, skip_scale=hi, sparsity=skipped / visited,
                       lambda_at_last_query=hi / (positions[0] + 1), skipped_tiles=skipped,
                       proved_by_bound=proved, proved_fraction=proved / max(skipped, 1))
            rows.append(row)
            print(f"[{time.time() - t0:5.1f}s] bound over {bound_keys:3d} keys, {num_splits} splits: scale "
                  f"{hi:.4g} (lambda {row['lambda_at_last_query']:.3f}) skips {row['sparsity']:.3f} of tiles; "
                  f"the bound proves {row['proved_fraction']:.3f} of those", flush=True)
    result = dict(device="cpu", host=platform.processor() or platform.machine(), torch=torch.__version__,
                  commit=args.commit or git_commit(), model=args.model, config=vars(args), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
