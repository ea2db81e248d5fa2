"""Skip-softmax prefill: which tiling gains most at a given sparsity, and what a skipped tile costs (one GPU).

    python benchmarks/prefill_skip_configs.py --contexts 32768,65536 --target 0.7

For each context, the dense kernel as the engine calls it, then every candidate configuration
(BLOCK_M, BLOCK_N, warps, stages) at the skip_scale that brings its own tiles to `--target`
sparsity (bisection on the counters: the sparsity of a scale depends on the tile shape). Same data
and timing as `attention.py` (`--data sink`). Prints ms, sparsity and the speedup against the
dense kernel of the same run.

The floor: for the engine's skip-softmax tiling, the same kernel with nothing skipped (a scale of
1e-30) and with every tile after the first skipped (1e30) gives the cost of a kept and of a
skipped tile; a skipped tile still loads K and computes QK^T, so at sparsity s the kernel can at
best take (1 - s) * t_none + s * t_all, and `floor_speedup` is the dense time over that. Writes
benchmarks/results/prefill_skip_configs.json.
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

from benchmarks.attention import Bench, git_commit  # noqa: E402
from benchmarks.attention import parse_args as attention_args  # noqa: E402

CANDIDATES = [  # (block_m, block_n, num_warps, num_stages)
    (64, 128, 4, 2), (64, 128, 4, 1), (64, 128, 4, 3), (64, 128, 8, 2), (64, 256, 4, 2), (64, 256, 8, 2),
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 256, 8, 2), (128, 64, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2),
    (64, 64, 2, 2), (32, 64, 2, 2),
]


def main(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--target", type=float, default=0.7, help="sparsity each candidate is brought to")
    target, rest = own.parse_known_args(argv)
    target = target.target
    args = attention_args(rest + ["--phases", "prefill"])
    import torch
    import triton

    from slipstream.kernels import paged_attention
    from slipstream.kernels.attention import prefill_config
    from slipstream.kernels.prefill_attention import paged_prefill_attention

    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_skip_configs.py needs a CUDA GPU")
    bench = Bench(args)
    rows, floors, t0 = [], [], time.time()
    for L in args.contexts:
        data = bench.make([L] * args.prefill_batch, [L] * args.prefill_batch)
        call = (data["q"], data["k_cache"], data["v_cache"], data["cu"], data["seq_lens"], data["tables"],
                args.head_dim**-0.5)
        dense_ms = bench.time_ms(lambda: paged_attention(*call, max_q_len=L), 3)
        dense_out = paged_attention(*call, max_q_len=L)
        print(f"[{time.time() - t0:6.1f}s] ctx {L}: dense {dense_ms:.3f} ms", flush=True)
        bm, bn, w, st = prefill_config(L, args.head_dim, True)
        extremes = {}
        for name, scale in (("none", 1e-30), ("all", 1e30)):
            counters = torch.zeros(2, dtype=torch.int64, device=bench.dev)
            paged_attention(*call, max_q_len=L, skip_scale=scale, counters=counters)
            c = counters.tolist()
            extremes[name] = (bench.time_ms(lambda: paged_attention(*call, max_q_len=L, skip_scale=scale), 3),
                              c[0] / max(c[1], 1))
        (t_none, _), (t_all, s_all) = extremes["none"], extremes["all"]
        # per-tile costs from the two runs: t = tiles * (kept + s * (skipped - kept))
        t_floor = t_none + (t_all - t_none) * target / s_all
        floor = dict(context=L, block_m=bm, block_n=bn, num_warps=w, num_stages=st, nothing_skipped_ms=t_none,
                     all_skipped_ms=t_all, all_skipped_sparsity=s_all, skipped_tile_cost=(t_all - t_none * (1 - s_all))
                     / s_all / t_none, floor_ms=t_floor, floor_speedup=dense_ms / t_floor, dense_ms=dense_ms)
        floors.append(floor)
        print(f"  engine tiling {bm}x{bn} w{w} s{st}: nothing skipped {t_none:.3f} ms, all skipped {t_all:.3f} ms "
              f"(sparsity {s_all:.3f}): a skipped tile costs {floor['skipped_tile_cost']:.2f} of a kept one; "
              f"at {target:.2f} at best {t_floor:.3f} ms = {floor['floor_speedup']:.2f}x dense", flush=True)
        for bm, bn, w, st in CANDIDATES:
            def run(scale, counters=None, bm=bm, bn=bn, w=w, st=st):
                return paged_prefill_attention(*call, max_q_len=L, skip_scale=scale, counters=counters,
                                               block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            try:
                scale, sparsity = bench.scale_for(run, target, steps=10)
                ms = bench.time_ms(lambda: run(scale), 3)
                err = (run(scale).float() - dense_out.float()).abs().max().item()
            except Exception as e:  # a tiling that does not fit this GPU's shared memory
                print(f"  {bm}x{bn} w{w} s{st}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row = dict(context=L, block_m=bm, block_n=bn, num_warps=w, num_stages=st,
                       skip_scale=scale, sparsity=sparsity, ms=ms, dense_ms=dense_ms,
                       speedup_vs_dense=dense_ms / ms, max_err_vs_dense=err)
            rows.append(row)
            print(f"  {bm:>3}x{bn:<3} w{w} s{st}: scale {scale:9.3g} sparsity {sparsity:.3f} "
                  f"{ms:8.3f} ms  {dense_ms / ms:.2f}x dense", flush=True)
        del data, dense_out
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit or git_commit(), target_sparsity=target,
                  config={k: v for k, v in vars(args).items() if k != "out"}, floors=floors, rows=rows)
    out = ROOT / "benchmarks" / "results" / "prefill_skip_configs.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
