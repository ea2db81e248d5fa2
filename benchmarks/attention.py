"""Attention kernels on one GPU: paged prefill and decode, dense and skip-softmax, against torch SDPA.

    python benchmarks/attention.py                 # default sweep, ~4 minutes on one H100/H200
    python benchmarks/attention.py --contexts 4096,8192 --skip-scales 0,1 --iters 5

One row per (phase, context, batch, skip_scale). Columns: `ms` (GPU time of the op as the engine
calls it, without counters; L2 flushed before each run, the host's launch overhead hidden behind a
spin kernel), `sparsity` (skipped / visited key tiles, from a separate run with counters),
`dense_ms` (the same op with skip_scale = 0), `sdpa_ms` (torch SDPA with the flash backend on
contiguous K/V, same data, same run), `tflops` (prefill: causal attention FLOPs,
2 * 2 * heads * head_dim * L(L+1)/2 per sequence, counted dense, over `ms`) or `tbps` (decode: K/V
bytes the kernel reads, V of skipped tiles left out, over `ms`), and the output's error against
dense and against SDPA.

Data (`--data sink`, the default): real attention puts most of a row's weight on few keys; this
synthetic stand-in has queries of one kv head along a direction u, unit-variance noise keys, "sink"
keys 0..3 along u scoring `--gap` above the noise, and sparse "retrieval" keys (one per
`--retrieval-every` tokens) scoring gap - 2. `--data random` is plain normal q/k/v (skip-softmax finds
almost nothing to skip there: it measures the skip test's overhead). Writes
benchmarks/results/attention.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--phases", default="prefill,decode", help="comma list of prefill, decode")
    p.add_argument("--contexts", type=ints, default=[4096, 8192, 16384, 32768, 65536], help="context lengths")
    p.add_argument("--decode-batches", type=ints, default=[1, 32], help="sequences per decode step")
    p.add_argument("--decode-q-len", type=int, default=1, help="query tokens per sequence in decode (<= 16)")
    p.add_argument("--prefill-batch", type=int, default=1, help="sequences per prefill call (whole prompts)")
    p.add_argument("--skip-scales", type=floats, default=[0.0, 1.0, 16.0], help="skip_scale values (0 = dense)")
    p.add_argument("--target-sparsities", type=floats, default=[],
                   help="also rows at these sparsities: per row, skip_scale found by bisection on the counters")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16, help="KV cache block size (tokens)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--data", choices=["sink", "random"], default="sink")
    p.add_argument("--gap", type=float, default=16.0, help="sink score above the noise keys (natural log units)")
    p.add_argument("--retrieval-every", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--max-prefill-flops", type=float, default=2e14,
                   help="fewer timed iterations for prefill rows above this many FLOPs per call")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD of this checkout)")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    for ph in args.phases:
        if ph not in ("prefill", "decode"):
            p.error(f"unknown phase {ph!r}")
    if not 1 <= args.decode_q_len <= 16:
        p.error("--decode-q-len must be in 1..16")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or len(sha) != 40:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


class Bench:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.dev = torch.device("cuda")
        self.dtype = getattr(torch, DTYPES[args.dtype])
        self.gen = torch.Generator(device=self.dev).manual_seed(args.seed)
        # Flushed before each timed launch so that no run reads K/V left in L2 by the previous one.
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=self.dev)

    def time_ms(self, fn, iters=None):
        """Median GPU time of fn: L2 flushed before each run, and the GPU kept busy (a spin kernel) while the
        host launches it, so that the Python launch overhead stays out of the number."""
        torch = self.torch
        iters = iters or self.args.iters
        for _ in range(self.args.warmup):
            fn()
        sleep = getattr(torch.cuda, "_sleep", None)
        times = []
        for _ in range(iters):
            self.flush.zero_()
            if sleep is not None:
                sleep(1_000_000)  # ~0.5 ms of spinning
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]

    def make(self, lens, q_lens):
        """Contiguous K/V per sequence and the same data in a paged cache with a shuffled block table."""
        torch, a = self.torch, self.args
        H, KVH, D, page = a.heads, a.kv_heads, a.head_dim, a.page
        group = H // KVH
        gen, dev = self.gen, self.dev
        B = len(lens)
        u = torch.nn.functional.normalize(torch.randn(KVH, D, device=dev, generator=gen), dim=-1)
        alpha = 16.0  # query norm along u
        ks, vs, qs = [], [], []
        for L, n in zip(lens, q_lens):
            k = torch.randn(L, KVH, D, device=dev, generator=gen)
            v = torch.randn(L, KVH, D, device=dev, generator=gen)
            q = torch.randn(n, H, D, device=dev, generator=gen)
            if a.data == "sink":
                q += alpha * u.repeat_interleave(group, 0)
                # Noise keys score ~N(0, 1 + alpha^2 / D) against these queries: scale them to unit variance.
                k /= math.sqrt(1 + alpha**2 / D)
                k[:4] = (a.gap * math.sqrt(D) / alpha) * u
                hot = torch.arange(a.retrieval_every // 2, L, a.retrieval_every, device=dev)
                k[hot] = ((a.gap - 2) * math.sqrt(D) / alpha) * u
            ks.append(k.to(self.dtype))
            vs.append(v.to(self.dtype))
            qs.append(q.to(self.dtype))
        n_blocks = [-(-L // page) for L in lens]
        total = sum(n_blocks)
        perm = torch.randperm(total, device=dev, generator=gen).to(torch.int32)
        tables = torch.full((B, max(n_blocks)), -1, dtype=torch.int32, device=dev)
        k_cache = torch.empty(total, page, KVH, D, dtype=self.dtype, device=dev)
        v_cache = torch.empty_like(k_cache)
        used = 0
        for s, L in enumerate(lens):
            blocks = perm[used : used + n_blocks[s]]
            used += n_blocks[s]
            tables[s, : n_blocks[s]] = blocks
            pad = n_blocks[s] * page - L
            for src, cache in ((ks[s], k_cache), (vs[s], v_cache)):
                padded = torch.cat([src, src.new_zeros(pad, KVH, D)]) if pad else src
                cache[blocks.long()] = padded.view(-1, page, KVH, D)
        q = torch.cat(qs)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        return dict(q=q, k_cache=k_cache, v_cache=v_cache, cu=cu, seq_lens=seq_lens, tables=tables,
                    ks=ks, vs=vs, qs=qs)

    def scale_for(self, run, target: float, steps: int = 14) -> tuple[float, float]:
        """(skip_scale, sparsity) with the sparsity closest to `target`: bisection on log(skip_scale),
        the skipped fraction being non-decreasing in the scale. `run(skip_scale, counters)`."""
        torch = self.torch

        def sparsity(scale):
            counters = torch.zeros(2, dtype=torch.int64, device=self.dev)
            run(scale, counters)
            c = counters.tolist()
            return c[0] / max(c[1], 1)

        lo, hi = -12.0, 24.0  # log2 of the scale
        best = None
        for _ in range(steps):
            mid = (lo + hi) / 2
            sp = sparsity(2.0**mid)
            if best is None or abs(sp - target) < abs(best[1] - target):
                best = (2.0**mid, sp)
            if sp < target:
                lo = mid
            else:
                hi = mid
        return best

    def sdpa(self, data, causal_square: bool):
        """torch SDPA (flash backend) on contiguous [B, heads, L, D]; equal lengths only."""
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.stack(data["qs"]).transpose(1, 2)  # [B, H, n, D]
        k = torch.stack(data["ks"]).transpose(1, 2)  # [B, KVH, L, D]
        v = torch.stack(data["vs"]).transpose(1, 2)
        n, L = q.shape[2], k.shape[2]
        F = torch.nn.functional

        if causal_square or n == 1:
            kwargs = dict(is_causal=causal_square)
        else:  # a few query tokens at the end of the context: explicit mask (not the flash backend)
            mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(L - n, L, device=q.device)[:, None]
            kwargs = dict(attn_mask=mask)
        backends = [SDPBackend.FLASH_ATTENTION] if "attn_mask" not in kwargs else [SDPBackend.EFFICIENT_ATTENTION]
        scale = self.args.head_dim**-0.5

        def run_gqa():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kwargs)

        try:
            run_gqa()
            fn = run_gqa
        except RuntimeError:  # no GQA in this backend: expand K/V (more bytes than the kernel reads)
            group = q.shape[1] // k.shape[1]
            ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

            def fn():
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q, ke, ve, scale=scale, **kwargs)

        def run():
            return fn().transpose(1, 2).reshape(-1, q.shape[1], q.shape[3])

        return run

    def rows_for(self, phase, L, batch):
        torch, a = self.torch, self.args
        from slipstream.kernels import paged_attention

        q_len = L if phase == "prefill" else a.decode_q_len
        data = self.make([L] * batch, [q_len] * batch)
        scale = a.head_dim**-0.5
        call_args = (data["q"], data["k_cache"], data["v_cache"], data["cu"], data["seq_lens"], data["tables"], scale)
        flops = 4 * a.heads * a.head_dim * batch * (L * (L + 1) // 2 if phase == "prefill" else q_len * L)
        iters = a.iters
        if phase == "prefill" and flops > a.max_prefill_flops:
            iters = max(3, a.iters // 3)

        def run(skip_scale, counters=None):
            return paged_attention(*call_args, max_q_len=q_len, skip_scale=skip_scale, counters=counters)

        dense_out = run(0.0)
        dense_ms = self.time_ms(lambda: run(0.0), iters)
        sdpa_run = self.sdpa(data, causal_square=phase == "prefill")
        sdpa_out = sdpa_run()
        sdpa_ms = self.time_ms(sdpa_run, iters)
        err_sdpa = (dense_out.float() - sdpa_out.float()).abs().max().item()
        del sdpa_out
        kv_elem = a.kv_heads * a.head_dim * data["k_cache"].element_size()
        rows = []
        settings = [(s, None) for s in a.skip_scales] + [(None, t) for t in a.target_sparsities]
        for skip_scale, target in settings:
            if target is not None:
                skip_scale, _ = self.scale_for(run, target)
            if skip_scale == 0:
                ms, sparsity, out = dense_ms, 0.0, dense_out
            else:
                counters = torch.zeros(2, dtype=torch.int64, device=self.dev)
                out = run(skip_scale, counters)
                c = counters.tolist()
                sparsity = c[0] / max(c[1], 1)
                ms = self.time_ms(lambda: run(skip_scale), iters)
            err_dense = (out.float() - dense_out.float()).abs().max().item()
            row = dict(phase=phase, context=L, batch=batch, q_len=q_len, skip_scale=skip_scale,
                       target_sparsity=target, ms=ms,
                       sparsity=sparsity, dense_ms=dense_ms, sdpa_ms=sdpa_ms, speedup_vs_dense=dense_ms / ms,
                       speedup_vs_sdpa=sdpa_ms / ms, max_err_vs_dense=err_dense, dense_max_err_vs_sdpa=err_sdpa)
            if phase == "prefill":
                row["tflops"] = flops / ms / 1e9
                row["sdpa_tflops"] = flops / sdpa_ms / 1e9
            else:
                # K for every visited tile, V only for the kept ones (tile granularity, counted per token).
                kv_bytes = batch * L * kv_elem * (2 - sparsity)
                row["tbps"] = kv_bytes / ms / 1e9
                row["sdpa_tbps"] = batch * L * kv_elem * 2 / sdpa_ms / 1e9
            rows.append(row)
        del data, dense_out
        torch.cuda.empty_cache()
        return rows


def print_table(rows):
    head = ["phase", "ctx", "B", "skip", "ms", "sparsity", "dense_ms", "sdpa_ms", "TFLOP/s|TB/s", "err_dense"]
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        rate = r.get("tflops", r.get("tbps"))
        vals = [r["phase"], r["context"], r["batch"], r["skip_scale"], f"{r['ms']:.3f}", f"{r['sparsity']:.3f}",
                f"{r['dense_ms']:.3f}", f"{r['sdpa_ms']:.3f}", f"{rate:.2f}", f"{r['max_err_vs_dense']:.2e}"]
        print(" ".join(f"{v:>12}" for v in map(str, vals)))


def main(argv=None):
    args = parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    bench = Bench(args)
    t0 = time.time()
    rows = []
    for phase in args.phases:
        batches = [args.prefill_batch] if phase == "prefill" else args.decode_batches
        for L in args.contexts:
            for B in batches:
                rows.extend(bench.rows_for(phase, L, B))
                r = rows[-1]
                print(f"[{time.time() - t0:6.1f}s] {phase} ctx={L} B={B} dense {r['dense_ms']:.3f} ms, "
                      f"sdpa {r['sdpa_ms']:.3f} ms", flush=True)
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=args.commit or git_commit(),
        config={k: v for k, v in vars(args).items() if k != "out"},
        wall_s=round(time.time() - t0, 1),
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  commit {result['commit']}")
    print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
