"""GPU time of the kernels a decode step's projections choose between.

    python benchmarks/linear_variants.py [--model qwen2.5-0.5b] [--m 1]

For each projection of the model's shape at M rows (decode), times in a CUDA graph of 200
back-to-back launches (so launch gaps count as they do in the engine's graphs), cycling through
copies of the weight that together make twice the L2 cache (as in a decode step, each call reads
its weights from HBM; `--hot` times one matrix, which stays in L2 when it fits): each way
`decode_linear.linear` times (`linear_candidates`: cuBLAS, the tiled and the GEMV Triton kernels,
split-K GEMVs for tall matrices),
the norm and SiLU kernels around the projections and `norm_linear`'s fused and separate forms,
and what `linear` picks. Prints us per call and the bandwidth of the weight read; writes
benchmarks/results/linear_variants_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.engine_decode import QWEN_SHAPES  # noqa: E402


def graph_time(fn, weights: list, reps: int = 200) -> float:
    """Microseconds per call of `fn(weight)`, captured `reps` times in one CUDA graph, the calls
    cycling through `weights`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(weights[0])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(weights[i % len(weights)])
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1000 / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(QWEN_SHAPES))
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--hot", action="store_true", help="time on one weight matrix (L2-resident when it fits)")
    ap.add_argument("--commit", default=None, help="commit to record (default: $SLIPSTREAM_COMMIT, else git)")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/linear_variants_<model>.json)")
    args = ap.parse_args()

    from slipstream.kernels import decode_linear as fo
    from slipstream.kernels import fused_ops

    H, _, heads, kv_heads, I, V, _ = QWEN_SHAPES[args.model]
    qkv_n = H + 2 * kv_heads * (H // heads)
    dev, dt = torch.device("cuda"), torch.bfloat16
    M = args.m
    x = torch.randn(M, H, device=dev, dtype=dt)
    res = torch.randn(M, H, device=dev, dtype=dt)
    nw = torch.ones(H, device=dev, dtype=dt)
    gu = torch.randn(M, 2 * I, device=dev, dtype=dt)

    print(f"{args.model}, {M} row(s), bf16, {torch.cuda.get_device_name()}, {'hot' if args.hot else 'cold'} weights")
    rows = []
    for name, K, N in [("qkv", H, qkv_n), ("o", H, H), ("gate_up", H, 2 * I), ("down", I, H), ("lm_head", H, V)]:
        w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        ws = [w] if args.hot else fo._cold_weights(w)
        xin = torch.randn(M, K, device=dev, dtype=dt)
        t = {f"{k}/{bn}": graph_time(lambda wt, k=k, bn=bn: fo.linear(xin, wt, way=(k, bn)), ws)
             for k, bn in fo.linear_candidates(M, N, K, torch.cuda.get_device_properties(dev).multi_processor_count)}
        if name in ("qkv", "gate_up"):
            t["rms_norm kernel"] = graph_time(lambda wt: fused_ops.rms_norm(x, nw, 1e-6, res), ws)
            sw = name == "gate_up"
            for way in (("separate", 0), ("fused", 4), ("fused", 16)):
                t[f"norm_linear {way[0]}/{way[1]}{' swiglu' if sw else ''}"] = graph_time(
                    lambda wt, way=way: fo.norm_linear(x, nw, 1e-6, wt, None, res, swiglu=sw, way=way), ws)
        if name == "down":
            t["silu_mul kernel"] = graph_time(lambda wt: fused_ops.silu_mul(gu), ws)
        if name == "lm_head":
            t["cublas + float()"] = graph_time(lambda wt: F.linear(xin, wt).float(), ws)
            t["picked, fp32 out"] = graph_time(lambda wt: fo.linear(xin, wt, out_dtype=torch.float32), ws)
        fo.linear(xin, w)
        t["linear() picks"] = graph_time(lambda wt: fo.linear(xin, wt), ws)
        del ws
        mb = N * K * 2 / 1e6
        for k, us in t.items():
            print(f"{name:8s} {N:6d}x{K:<5d} {k:20s} {us:8.2f} us  {mb / us:6.2f} TB/s", flush=True)
            rows.append({"projection": name, "N": N, "K": K, "way": k, "us": us, "tb_per_s": mb / us})
    import triton

    from benchmarks.longtail import commit_of

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit_of(args.commit), "model": args.model, "rows_m": M,
            "weights": "one matrix (hot)" if args.hot else "cycled copies, 2x L2 (cold)"}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"linear_variants_{args.model}{'_hot' if args.hot else ''}.json")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
