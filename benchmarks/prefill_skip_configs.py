"""Skip-softmax prefill: which tiling and V-load placement gains most at a given sparsity (one GPU).

    python benchmarks/prefill_skip_configs.py --contexts 32768,65536 --target 0.7

For each context, the dense kernel as the engine calls it, then every candidate configuration
(BLOCK_M, BLOCK_N, warps, stages, V loaded before or inside the skip branch) at the skip_scale
that brings its own tiles to `--target` sparsity (bisection on the counters: the sparsity of a
scale depends on the tile shape). Same data and timing as `attention.py` (`--data sink`). Prints
ms, sparsity and the speedup against the dense kernel of the same run; writes
benchmarks/results/prefill_skip_configs.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.attention import Bench, git_commit  # noqa: E402
from benchmarks.attention import parse_args as attention_args  # noqa: E402

CANDIDATES = [  # (block_m, block_n, num_warps, num_stages, preload_v)
    (64, 128, 4, 2, False), (64, 128, 4, 2, True), (64, 128, 4, 3, True),
    (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 128, 8, 2, True), (128, 128, 8, 3, True),
    (128, 64, 4, 3, False), (128, 64, 4, 3, True), (64, 64, 4, 3, True),
]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    target = 0.7
    if "--target" in argv:
        i = argv.index("--target")
        target = float(argv[i + 1])
        del argv[i:i + 2]
    args = attention_args(argv + ["--phases", "prefill"])
    import torch
    import triton

    from slipstream.kernels import paged_attention
    from slipstream.kernels.prefill_attention import paged_prefill_attention

    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_skip_configs.py needs a CUDA GPU")
    bench = Bench(args)
    rows, t0 = [], time.time()
    for L in args.contexts:
        data = bench.make([L] * args.prefill_batch, [L] * args.prefill_batch)
        call = (data["q"], data["k_cache"], data["v_cache"], data["cu"], data["seq_lens"], data["tables"],
                args.head_dim**-0.5)
        dense_ms = bench.time_ms(lambda: paged_attention(*call, max_q_len=L), 3)
        dense_out = paged_attention(*call, max_q_len=L)
        print(f"[{time.time() - t0:6.1f}s] ctx {L}: dense {dense_ms:.3f} ms", flush=True)
        for bm, bn, w, st, pre in CANDIDATES:
            def run(scale, counters=None, bm=bm, bn=bn, w=w, st=st, pre=pre):
                return paged_prefill_attention(*call, max_q_len=L, skip_scale=scale, counters=counters,
                                               block_m=bm, block_n=bn, num_warps=w, num_stages=st, preload_v=pre)
            try:
                scale, sparsity = bench.scale_for(run, target, steps=10)
                ms = bench.time_ms(lambda: run(scale), 3)
                err = (run(scale).float() - dense_out.float()).abs().max().item()
            except Exception as e:  # a tiling that does not fit this GPU's shared memory
                print(f"  {bm}x{bn} w{w} s{st} preload={pre}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row = dict(context=L, block_m=bm, block_n=bn, num_warps=w, num_stages=st, preload_v=pre,
                       skip_scale=scale, sparsity=sparsity, ms=ms, dense_ms=dense_ms,
                       speedup_vs_dense=dense_ms / ms, max_err_vs_dense=err)
            rows.append(row)
            print(f"  {bm:>3}x{bn:<3} w{w} s{st} preload={pre!s:5}: scale {scale:9.3g} sparsity {sparsity:.3f} "
                  f"{ms:8.3f} ms  {dense_ms / ms:.2f}x dense", flush=True)
        del data, dense_out
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit or git_commit(), target_sparsity=target,
                  config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows)
    out = ROOT / "benchmarks" / "results" / "prefill_skip_configs.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
