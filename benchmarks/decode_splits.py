"""Dense paged decode attention against its split-K factor, with the GPU's waves of programs (one GPU).

    python benchmarks/decode_splits.py --shapes 65536x1,32768x1,8192x8,32768x8,8192x32 \\
        [--decode-q-len 4] --commit SHA

For each (context x batch) the dense decode kernel as the engine calls it (`choose_num_splits`
with the fit read from the compiled kernel), then forced to each of `--splits`. Prints ms, K/V
read rate (TB/s) and the programs launched in waves of the programs that fit on the GPU at once
(`programs_per_sm`, when this Triton exposes the compiled kernel). Same data and timing as
`attention.py`. Writes benchmarks/results/decode_splits.json.
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


def last_compiled(jit_fn):
    """The most recently compiled kernel of a Triton JITFunction (None if this Triton hides it)."""
    try:
        caches = [c[0] for c in jit_fn.device_caches.values()]
        kernels = [k for cache in caches for k in cache.values()]
        return kernels[-1] if kernels else None
    except (AttributeError, IndexError, TypeError):
        return None


def main(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--shapes", default="65536x1,32768x1,8192x8,32768x8,8192x32",
                     help="comma list of CONTEXTxBATCH")
    own.add_argument("--splits", default="8,16,24,32,48,64,96,128", help="forced split counts (comma list)")
    mine, rest = own.parse_known_args(argv)
    out = ROOT / "benchmarks" / "results" / "decode_splits.json"
    args = attention_args(rest + ["--phases", "decode"] + ([] if "--out" in rest else ["--out", str(out)]))
    import torch
    import triton

    from slipstream.kernels.attention import decode_block_n
    from slipstream.kernels.paged_attention import (choose_num_splits, paged_decode_attention, programs_per_sm,
                                                    sm_count)

    # `slipstream.kernels.paged_attention` the attribute is the op; the module holds the kernel.
    kernel_fn = sys.modules["slipstream.kernels.paged_attention"]._decode_kernel
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_splits.py needs a CUDA GPU")
    bench = Bench(args)
    sms = sm_count(bench.dev)
    kv_elem = args.kv_heads * args.head_dim * torch.tensor([], dtype=bench.dtype).element_size() * 2
    rows, t0 = [], time.time()
    for shape in mine.shapes.split(","):
        L, batch = (int(x) for x in shape.split("x"))
        q_len = args.decode_q_len
        data = bench.make([L] * batch, [q_len] * batch)
        call = (data["q"], data["k_cache"], data["v_cache"], data["cu"], data["seq_lens"], data["tables"],
                args.head_dim**-0.5)
        width = data["tables"].shape[1] * args.page
        ref = paged_decode_attention(*call, max_q_len=q_len)
        for splits in [None] + [int(s) for s in mine.splits.split(",") if s]:
            out_ = paged_decode_attention(*call, max_q_len=q_len, num_splits=splits)
            err = (out_.float() - ref.float()).abs().max().item()
            ms = bench.time_ms(lambda: paged_decode_attention(*call, max_q_len=q_len, num_splits=splits))
            try:
                per_sm = programs_per_sm(last_compiled(kernel_fn), bench.dev)
            except AttributeError:  # a Triton that hides the compiled kernel or its fields
                per_sm = None
            # The op's own choice, from the same fit (what it read from the compiled kernel).
            n = splits or choose_num_splits(batch, args.kv_heads, width, decode_block_n(False), sms,
                                            resident_per_sm=per_sm)
            programs = batch * args.kv_heads * n
            row = dict(context=L, batch=batch, q_len=q_len, num_splits=n, heuristic=splits is None, ms=ms,
                       tbps=batch * L * kv_elem / ms / 1e9, programs=programs, resident_per_sm=per_sm,
                       waves=programs / (per_sm * sms) if per_sm else None, max_err_vs_heuristic=err)
            rows.append(row)
            waves = f"{row['waves']:.2f} waves of {per_sm * sms}" if per_sm else "waves unknown"
            tag = " (heuristic)" if splits is None else ""
            print(f"[{time.time() - t0:6.1f}s] {L:6d} x {batch:3d} q {q_len:2d}  splits {n:4d}{tag}"
                  f"  {ms:.4f} ms  {row['tbps']:.2f} TB/s  {programs} programs, {waves}", flush=True)
        del data
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit or git_commit(), sms=sms,
                  config={k: v for k, v in vars(args).items() if k != "out"} | vars(mine), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
