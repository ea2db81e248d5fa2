"""GPU correctness check of the Triton attention kernels against the torch references.

    python benchmarks/kernels_gpu_check.py

Random paged batches (shuffled pages, ragged lengths, GQA) with a few strongly attended "sink"
keys so that skip-softmax really skips: dense prefill and decode vs `paged_attention_ref`, and
skip-softmax vs `paged_attention_sparse_ref` with the kernels' own tiling (output and skipped-tile
counts). Also the RoPE table kernel against torch's cos/sin, bit for bit in bf16, and, where the
kernels launch with PDL, that decode attention sees the K/V that the kernel before it stores (a
store kernel that is still running must not be missed).
Prints one line per case and exits non-zero on any failure.
"""

from __future__ import annotations

import os
import sys

import torch

DEVICE = os.environ.get("CHECK_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a dry run of this script
SMALL = DEVICE == "cpu"

from slipstream.kernels import paged_attention, paged_attention_ref
from slipstream.kernels.attention import MAX_DECODE_Q_LEN, decode_block_n, prefill_config
from slipstream.kernels.sparse_reference import paged_attention_sparse_ref


def paged_batch(lens, q_lens, heads, kv_heads, dim, page, dtype, gen):
    blocks = sum(-(-n // page) for n in lens) + 8
    k_cache = torch.randn(blocks, page, kv_heads, dim, generator=gen) * 0.5
    v_cache = torch.randn(blocks, page, kv_heads, dim, generator=gen)
    k_cache[:, 0] *= 8.0  # the first token of every page is a strongly attended key
    order = torch.randperm(blocks, generator=gen).tolist()
    width = max(-(-n // page) for n in lens)
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for s, n in enumerate(lens):
        for b in range(-(-n // page)):
            tables[s, b] = order.pop()
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    q[:, :, :] += k_cache[0, 0].repeat_interleave(heads // kv_heads, 0) * 0.05
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to), cu.to(**to),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE), tables.to(**to))


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for dim in (64, 128):
        cases = ((("prefill", [200, 90], [200, 30]), ("decode", [300, 150], [1, 16])) if SMALL else
                 (("prefill", [1024, 400, 700], [1024, 200, 1]), ("decode", [2000, 600, 1500], [1, 4, 16])))
        for phase, lens, q_lens in cases:
            args = paged_batch(lens, q_lens, 4 if SMALL else 16, 2 if SMALL else 4, dim, 16,
                               torch.float32 if SMALL else torch.bfloat16, gen)
            max_q = max(q_lens)
            scale = dim**-0.5
            ref = paged_attention_ref(*[a.float() if a.is_floating_point() else a for a in args], scale)
            dense = paged_attention(*args, scale, max_q_len=max_q).float()
            err = (dense - ref).abs().max().item()
            ok = err < 3e-2
            failures += not ok
            print(f"{phase:7s} dim {dim:3d} dense        max|err| {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
            for skip in (1.0, 16.0):
                counters = torch.zeros(2, dtype=torch.int64, device=DEVICE)
                out = paged_attention(*args, scale, max_q_len=max_q, skip_scale=skip, counters=counters).float()
                if max_q <= MAX_DECODE_Q_LEN:  # one split-K part: the decode kernel's tiling at num_splits=1
                    block_m, block_n = None, decode_block_n(True)
                    counters_single = torch.zeros(2, dtype=torch.int64, device=DEVICE)
                    from slipstream.kernels.paged_attention import paged_decode_attention

                    out = paged_decode_attention(*args, scale, max_q_len=max_q, skip_scale=skip,
                                                 counters=counters_single, num_splits=1).float()
                    counters = counters_single
                else:
                    block_m, block_n, _, _ = prefill_config(max_q, dim, True, args[0].element_size())
                fargs = [a.float() if a.is_floating_point() else a for a in args]
                sref = paged_attention_sparse_ref(*fargs, scale, skip_scale=skip, block_n=block_n, block_m=block_m)
                k_skipped, k_visited = counters.tolist()
                r_sparsity = sref.skipped_tiles / max(sref.visited_tiles, 1)
                k_sparsity = k_skipped / max(k_visited, 1)
                err = (out - sref.out).abs().max().item()
                # bf16 scores can flip a borderline skip decision: allow a small sparsity difference
                ok = err < 5e-2 and abs(k_sparsity - r_sparsity) < 0.02 and k_visited == sref.visited_tiles
                failures += not ok
                print(f"{phase:7s} dim {dim:3d} skip {skip:5.1f} sparsity kernel {k_sparsity:.3f} ref {r_sparsity:.3f}"
                      f" max|err| {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    failures += not rope_tables_match()
    failures += not pdl_sees_new_kv(gen)
    print("all ok" if not failures else f"{failures} failures")
    return 1 if failures else 0


def rope_tables_match() -> bool:
    from slipstream.kernels.fused_ops import rope_cos_sin, rope_cos_sin_torch

    pos = torch.arange(0, 2**17, device=DEVICE)
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))).to(DEVICE)
    dtype = torch.float32 if SMALL else torch.bfloat16
    got = rope_cos_sin(pos, inv_freq, 1.0, dtype)
    want = rope_cos_sin_torch(pos, inv_freq, 1.0, dtype)
    tol = 1e-6 if SMALL else 0.0  # the interpreter's numpy cos/sin are not CUDA's
    differ = sum(((g.float() - w.float()).abs() > tol).sum().item() for g, w in zip(got, want))
    print(f"rope tables {dtype} positions 0..{2**17 - 1}: {differ} entries differ from torch "
          f"{'ok' if differ == 0 else 'FAIL'}", flush=True)
    return differ == 0


def pdl_sees_new_kv(gen) -> bool:
    """Decode attention launched right after a PDL kernel that stores the step's K/V only after
    spinning for 2 ms (longer than the host takes to launch the attention): the output must match
    the reference over the new K/V."""
    from slipstream.kernels.paged_attention import paged_decode_attention
    from slipstream.kernels.pdl import pdl_kwargs

    if not pdl_kwargs(torch.empty(0, device=DEVICE))["PDL"]:
        print("pdl ordering: PDL is off on this device, nothing to check", flush=True)
        return True
    import triton
    import triton.language as tl

    from slipstream.kernels.pdl import pdl_prologue

    @triton.jit
    def late_store(k_cache, v_cache, k_new, v_new, slots, SPIN_NS: tl.constexpr, WIDTH: tl.constexpr,
                   PDL: tl.constexpr):
        pdl_prologue(PDL)
        i = tl.program_id(0)
        start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                          pack=1)
        now = start
        while now - start < SPIN_NS:
            now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                            is_pure=False, pack=1)
        slot = tl.load(slots + i).to(tl.int64)
        offs = tl.arange(0, WIDTH)
        tl.store(k_cache + slot * WIDTH + offs, tl.load(k_new + i * WIDTH + offs))
        tl.store(v_cache + slot * WIDTH + offs, tl.load(v_new + i * WIDTH + offs))

    ok = True
    for q_lens in ([1, 1, 1], [1, 4, 16]):
        lens = [700, 65, 1500]  # the step's tokens start inside a key tile, or on its boundary
        q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(lens, q_lens, 16, 4, 128, 16, torch.bfloat16, gen)
        page = k_cache.shape[1]
        pos = torch.cat([torch.arange(n - m, n) for n, m in zip(lens, q_lens)])
        seq = torch.cat([torch.full((m,), s) for s, m in enumerate(q_lens)])
        slots = (tables.cpu()[seq, pos // page].long() * page + pos % page).to(DEVICE)
        width = k_cache.shape[2] * k_cache.shape[3]
        k_new = torch.randn(len(pos), width, generator=gen).to(DEVICE, torch.bfloat16)
        v_new = torch.randn(len(pos), width, generator=gen).to(DEVICE, torch.bfloat16)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        want_k.view(-1, width)[slots] = k_new
        want_v.view(-1, width)[slots] = v_new
        fargs = [a.float() if a.is_floating_point() else a for a in (q, want_k, want_v, cu, seq_lens, tables)]
        ref = paged_attention_ref(*fargs, 128**-0.5)
        worst = 0.0
        for _ in range(5):
            k_run, v_run = k_cache.clone(), v_cache.clone()  # the step's slots hold stale K/V
            torch.cuda.synchronize()
            late_store[(len(pos),)](k_run, v_run, k_new, v_new, slots, SPIN_NS=2_000_000, WIDTH=width,
                                    **pdl_kwargs(q))
            out = paged_decode_attention(q, k_run, v_run, cu, seq_lens, tables, 128**-0.5, max_q_len=max(q_lens))
            worst = max(worst, (out.float() - ref).abs().max().item())
        good = worst < 3e-2
        ok &= good
        print(f"pdl ordering q_lens {q_lens}: max|err| {worst:.2e} {'ok' if good else 'FAIL'}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
