"""Skip-softmax kernels: which configuration gains most at a given sparsity, and what a skipped tile costs (one GPU).

    python benchmarks/skip_configs.py --phase prefill --contexts 32768,65536 --target 0.7
    python benchmarks/skip_configs.py --phase decode --contexts 8192,32768,65536 --decode-batches 1,32

For each context (and, in decode, each batch), the dense kernel as the engine calls it, then every
candidate configuration at the skip_scale that brings its own tiles to `--target` sparsity
(bisection on the counters: the sparsity of a scale depends on the tile shape). Prefill candidates
are (BLOCK_M, BLOCK_N, warps, stages); decode candidates (BLOCK_N, warps, stages, splits per
(sequence, kv head)). Same data and timing as `attention.py` (`--data sink`). Prints ms, sparsity
and the speedup against the dense kernel of the same run.

The floor: for the engine's skip-softmax configuration, the same kernel with nothing skipped (a
scale of 1e-30) and with every tile after the first skipped (1e30) gives the cost of a kept and of
a skipped tile; a skipped tile still loads K and computes QK^T, so at sparsity s the kernel can at
best take (1 - s) * t_none + s * t_all, and `floor_speedup` is the dense time over that. Writes
benchmarks/results/{prefill,decode}_skip_configs.json (`--out` to change).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.attention import Bench, git_commit  # noqa: E402
from benchmarks.attention import parse_args as attention_args  # noqa: E402

PREFILL_CANDIDATES = [  # (block_m, block_n, num_warps, num_stages)
    (64, 128, 4, 2), (64, 128, 4, 1), (64, 128, 4, 3), (64, 128, 8, 2), (64, 256, 4, 2), (64, 256, 8, 2),
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 256, 8, 2), (128, 64, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2),
    (64, 64, 2, 2), (32, 64, 2, 2),
]
# decode candidates: the product of these lists (--block-n, --warps, --stages, --splits; splits 0 =
# the engine's heuristic for that tile)
DECODE_GRID = dict(block_n=[32, 64, 128], warps=[2, 4, 8], stages=[1, 2, 3], splits=[0, 4, 16, 32])


def prefill_setup(bench, L):
    from slipstream.kernels import paged_attention
    from slipstream.kernels.attention import prefill_config
    from slipstream.kernels.prefill_attention import paged_prefill_attention

    a = bench.args
    data = bench.make([L] * a.prefill_batch, [L] * a.prefill_batch)
    call = (data["q"], data["k_cache"], data["v_cache"], data["cu"], data["seq_lens"], data["tables"],
            a.head_dim**-0.5)

    def engine(scale=0.0, counters=None):
        return paged_attention(*call, max_q_len=L, skip_scale=scale, counters=counters)

    def candidate(c):
        bm, bn, w, st = c

        def run(scale, counters=None):
            return paged_prefill_attention(*call, max_q_len=L, skip_scale=scale, counters=counters,
                                           block_m=bm, block_n=bn, num_warps=w, num_stages=st)
        return dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st), run

    bm, bn, w, st = prefill_config(L, a.head_dim, True)
    return data, engine, dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st), PREFILL_CANDIDATES, candidate


def decode_setup(bench, L, batch, grid):
    from slipstream.kernels.attention import decode_block_n
    from slipstream.kernels.paged_attention import (choose_num_splits, decode_block_m, decode_launch_config,
                                                    paged_decode_attention, sm_count)

    a = bench.args
    q_len = a.decode_q_len
    data = bench.make([L] * batch, [q_len] * batch)
    call = (data["q"], data["k_cache"], data["v_cache"], data["cu"], data["seq_lens"], data["tables"],
            a.head_dim**-0.5)

    def engine(scale=0.0, counters=None):
        return paged_decode_attention(*call, max_q_len=q_len, skip_scale=scale, counters=counters)

    def splits_for(bn):
        width = data["tables"].shape[1] * a.page
        return choose_num_splits(batch, a.kv_heads, width, bn, sm_count(bench.dev), skip=True)

    def candidate(c):
        bn, w, st, sp = c
        sp = sp or splits_for(bn)

        def run(scale, counters=None):
            return paged_decode_attention(*call, max_q_len=q_len, skip_scale=scale, counters=counters,
                                          block_n=bn, num_warps=w, num_stages=st, num_splits=sp)
        return dict(block_n=bn, num_warps=w, num_stages=st, num_splits=sp), run

    block_n = decode_block_n(True)
    warps, stages = decode_launch_config(decode_block_m(q_len, a.heads // a.kv_heads), block_n, a.head_dim,
                                         data["q"].element_size())
    config = dict(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits_for(block_n))
    candidates = list(itertools.product(grid["block_n"], grid["warps"], grid["stages"], grid["splits"]))
    return data, engine, config, candidates, candidate


def main(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--phase", choices=["prefill", "decode"], default="prefill")
    own.add_argument("--target", type=float, default=0.7, help="sparsity each candidate is brought to")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    for name, default in DECODE_GRID.items():
        own.add_argument(f"--{name.replace('_', '-')}", type=ints, default=default,
                         help=f"decode candidates' {name} (comma list, default {default})")
    own.add_argument("--prefill-candidates", default=None,
                     help="prefill candidates as BMxBNxWARPSxSTAGES, comma separated (default: the built-in list)")
    mine, rest = own.parse_known_args(argv)
    target, phase = mine.target, mine.phase
    out = ROOT / "benchmarks" / "results" / f"{phase}_skip_configs.json"
    args = attention_args(rest + ["--phases", phase] + ([] if "--out" in rest else ["--out", str(out)]))
    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("benchmarks/skip_configs.py needs a CUDA GPU")
    bench = Bench(args)
    rows, floors, t0 = [], [], time.time()
    shapes = [(L, None) for L in args.contexts] if phase == "prefill" else \
        [(L, b) for L in args.contexts for b in args.decode_batches]
    for L, batch in shapes:
        if phase == "prefill":
            data, engine, config, candidates, candidate = prefill_setup(bench, L)
            if mine.prefill_candidates:
                candidates = [tuple(int(x) for x in c.split("x")) for c in mine.prefill_candidates.split(",")]
        else:
            grid = {name: getattr(mine, name) for name in DECODE_GRID}
            data, engine, config, candidates, candidate = decode_setup(bench, L, batch, grid)
        where = dict(context=L) if batch is None else dict(context=L, batch=batch)
        dense_ms = bench.time_ms(lambda: engine())
        dense_out = engine()
        print(f"[{time.time() - t0:6.1f}s] {where}: dense {dense_ms:.3f} ms", flush=True)
        extremes = {}
        for name, scale in (("none", 1e-30), ("all", 1e30)):
            counters = torch.zeros(2, dtype=torch.int64, device=bench.dev)
            engine(scale, counters)
            c = counters.tolist()
            extremes[name] = (bench.time_ms(lambda: engine(scale)), c[0] / max(c[1], 1))
        (t_none, _), (t_all, s_all) = extremes["none"], extremes["all"]
        # per-tile costs from the two runs: t = tiles * (kept + s * (skipped - kept))
        t_floor = t_none + (t_all - t_none) * target / s_all
        floor = dict(**where, **config, nothing_skipped_ms=t_none, all_skipped_ms=t_all, all_skipped_sparsity=s_all,
                     skipped_tile_cost=(t_all - t_none * (1 - s_all)) / s_all / t_none, floor_ms=t_floor,
                     floor_speedup=dense_ms / t_floor, dense_ms=dense_ms)
        floors.append(floor)
        print(f"  engine {config}: nothing skipped {t_none:.3f} ms, all skipped {t_all:.3f} ms "
              f"(sparsity {s_all:.3f}): a skipped tile costs {floor['skipped_tile_cost']:.2f} of a kept one; "
              f"at {target:.2f} at best {t_floor:.3f} ms = {floor['floor_speedup']:.2f}x dense", flush=True)
        for c in candidates:
            settings, run = candidate(c)
            try:
                scale, sparsity = bench.scale_for(run, target, steps=10)
                ms = bench.time_ms(lambda: run(scale))
                err = (run(scale).float() - dense_out.float()).abs().max().item()
            except Exception as e:  # a configuration that does not fit this GPU's shared memory
                print(f"  {settings}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row = dict(**where, **settings, skip_scale=scale, sparsity=sparsity, ms=ms, dense_ms=dense_ms,
                       speedup_vs_dense=dense_ms / ms, max_err_vs_dense=err)
            rows.append(row)
            print(f"  {' '.join(f'{k}={v}' for k, v in settings.items())}: scale {scale:9.3g} sparsity "
                  f"{sparsity:.3f} {ms:8.3f} ms  {dense_ms / ms:.2f}x dense  err {err:.2e}", flush=True)
        del data, dense_out
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["context"], r.get("batch"))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("best per shape:")
    for r in best.values():
        print(f"  {r}")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit or git_commit(), phase=phase, target_sparsity=target,
                  config={k: v for k, v in vars(args).items() if k != "out"}, floors=floors, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
