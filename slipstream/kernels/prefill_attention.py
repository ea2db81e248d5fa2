"""Causal varlen flash attention over the paged KV cache, for long query chunks (prefill, chunked prefill).

Queries are packed [T, heads, head_dim] with `cu_seqlens_q`; keys and values, the prefix and the
chunk's own (already written by `store_kv`), are gathered from the paged cache through the block
table. One program owns BLOCK_M consecutive query tokens of one sequence and one query head (GQA:
kv head = head // group). Query row i sits at position seq_len - q_len + i; the program walks the
key tiles that are fully visible to all its rows without masks, then the few tiles across the
diagonal with the causal mask; tiles above the diagonal are never visited. FlashAttention's online
softmax in base 2 (scores pre-multiplied by scale * log2(e)), float32 accumulation.

Skip-softmax (BLASST): with SKIP, a key tile whose row maxima all satisfy
m_tile < m_running + log2(lambda), lambda = skip_scale / seq_len, is dropped before the
exponentials, the V load and the P.V product. SKIP is a constexpr: skip_scale == 0 runs the dense
kernel. With COUNT, each program atomically adds (skipped tiles, visited tiles) to a counter pair.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slipstream.kernels.attention import prefill_config
from slipstream.kernels.paged_attention import _dot_precision, _walk_tiles, check_attention_inputs

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    cu_ptr, lens_ptr, bt_ptr, cnt_ptr,
    qk_scale, skip_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    num_q_tiles,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    SKIP: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr,
    COUNT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The last query tiles have the most keys: launch them first.
    q_tile = num_q_tiles - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP

    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    ctx = tl.load(lens_ptr + seq)
    m0 = q_tile * BLOCK_M
    active = m0 < q_len

    i = m0 + tl.arange(0, BLOCK_M)
    row_valid = i < q_len
    pos = ctx - q_len + i
    q_rows = (q_start + i).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_valid[:, None], other=0.0)

    first_pos = ctx - q_len + m0
    last_pos = ctx - q_len + tl.minimum(m0 + BLOCK_M, q_len) - 1
    kv_end = tl.where(active, last_pos + 1, 0)
    n_full = tl.where(active, (first_pos + 1) // BLOCK_N, 0)  # tiles every row sees entirely
    n_tiles = tl.cdiv(kv_end, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    log2_lambda = 0.0
    if SKIP:
        log2_lambda = tl.log2(skip_scale / ctx.to(tl.float32))
    n_skipped = n_tiles * 0

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    m_ref = tl.full([BLOCK_M], float("-inf"), tl.float32)  # the skip test uses the running maximum only
    acc, l_i, m_i, n_skipped = _walk_tiles(
        acc, l_i, m_i, n_skipped, q, 0, n_full, n_tiles, kv_end, row_valid, pos, m_ref, log2_lambda, qk_scale,
        bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
        HEAD_DIM, BLOCK_N, PAGE, SKIP, PREFETCH_PAGES, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None])
    if COUNT:
        if SKIP:
            tl.atomic_add(cnt_ptr, n_skipped)
        tl.atomic_add(cnt_ptr + 1, n_tiles)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, *, max_q_len: int, skip_scale: float = 0.0,
                            counters: torch.Tensor | None = None, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of packed query chunks over the paged cache -> [T, heads, head_dim] in q.dtype.

    Same contract as `paged_attention_ref`; `max_q_len` bounds every sequence's query count (it sizes
    the grid, so no host sync is needed).
    """
    T, H, D = q.shape
    _, page, KVH, _ = k_cache.shape
    B = seq_lens.shape[0]
    check_attention_inputs(q, k_cache, v_cache, scale, skip_scale, counters)
    cu_seqlens_q, seq_lens, block_tables = cu_seqlens_q.contiguous(), seq_lens.contiguous(), block_tables.contiguous()
    dm, dn, warps, stages = prefill_config(max_q_len, D, skip_scale > 0, q.element_size())
    block_m, block_n = block_m or dm, block_n or dn
    num_warps, num_stages = num_warps or warps, num_stages or stages
    for b in (block_m, block_n):
        if b < 16 or b & (b - 1):
            raise ValueError("block sizes must be powers of two >= 16")
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    out = torch.empty_like(q)
    if T == 0 or B == 0 or max_q_len <= 0:
        return out
    num_q_tiles = triton.cdiv(max_q_len, block_m)
    cnt = counters if counters is not None else cu_seqlens_q  # unused without COUNT
    _prefill_kernel[(num_q_tiles, B, H)](
        q, k_cache, v_cache, out,
        cu_seqlens_q, seq_lens, block_tables, cnt,
        float(scale) * LOG2E, float(skip_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        num_q_tiles,
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
        SKIP=skip_scale > 0, PREFETCH_PAGES=skip_scale == 0, COUNT=counters is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
