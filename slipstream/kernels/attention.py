"""The attention op the engine calls: paged, causal, packed varlen queries; Triton on GPU, torch on CPU.

`paged_attention` has exactly `paged_attention_ref`'s semantics (see reference.py for the cache
layout and the packing). Steps whose sequences have at most 16 query tokens (decode, speculative
verification) go to the decode/extend kernel, longer ones (prefill, chunked prefill) to the prefill
kernel. On CPU tensors the batched torch path (`paged_attention_torch`) runs, unless
TRITON_INTERPRET=1 is set, in which case the Triton kernels run in Triton's interpreter (tests).

`skip_scale > 0` turns on skip-softmax (BLASST): a key tile is dropped when, for every query row
of the kernel's query tile, its maximum score is below the running maximum + ln(lambda),
lambda = skip_scale / seq_len. Every dropped key then weighs at most skip_scale / seq_len times the
row's largest weight, so the dropped softmax mass of a row is at most skip_scale (relative to the
row maximum's weight), and the output moves by at most about 2 * skip_scale * max|v|.
`counters` (int32/int64, shape [2]) accumulates (skipped tiles, visited tiles).

Tiling constants live here so the CPU path (the sparse reference) uses the kernels' tiling
without importing Triton.
"""

from __future__ import annotations

import os

import torch

from slipstream.kernels.reference import paged_attention_torch
from slipstream.kernels.sparse_reference import paged_attention_sparse_ref

MAX_DECODE_Q_LEN = 16
DECODE_BLOCK_N = 64
# Skip-softmax decode walks 128-key tiles: on an H200 (bf16, 32/8 heads, 8k-64k, batch 1-32, 70%
# of tiles skipped) 3-9% faster than 64-key tiles at the same sparsity (`benchmarks/skip_configs.py`).
DECODE_SKIP_BLOCK_N = 128


def decode_block_n(skip: bool) -> int:
    """Keys per tile of the decode kernel (the granularity of its skip decisions)."""
    return DECODE_SKIP_BLOCK_N if skip else DECODE_BLOCK_N


def prefill_config(max_q_len: int, head_dim: int, skip: bool, elem_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel for 2-byte (or `elem_size`) inputs.

    Picked on an H200 (bf16, 32/8 heads, 8k and 32k causal prefill): dense 128x128 tiles; with skip-softmax
    and head_dim 128, 64-row query tiles (finer skip decisions, fewer live registers in the skip branch).
    float32 inputs take smaller tiles to fit shared memory.
    """
    if elem_size > 2:
        return (64, 64, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim > 128:
        return 64, 32, 4, 2
    if max_q_len <= 64:
        return 64, 128, 4, 3
    if head_dim > 64:
        return (64, 128, 4, 2) if skip else (128, 128, 8, 3)
    return 128, 128, 4, 3


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, *, max_q_len: int,
                    skip_scale: float = 0.0, counters: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries [T, heads, head_dim] over the paged KV cache -> [T, heads, head_dim].

    `max_q_len` must bound every sequence's query count (cu_seqlens_q differences); it picks the
    kernel and sizes the grid without a host sync.
    """
    if skip_scale < 0:
        raise ValueError("skip_scale must be >= 0")
    if (q.device.type == "cpu" and not triton_interpret()) or q.device.type not in ("cpu", "cuda"):
        if skip_scale == 0 and counters is None:
            return paged_attention_torch(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)
        # The kernels' skip decisions (one split-K part in decode).
        if max_q_len <= MAX_DECODE_Q_LEN:
            block_m, block_n = None, decode_block_n(skip_scale > 0)
        else:
            block_m, block_n, _, _ = prefill_config(max_q_len, q.shape[-1], skip_scale > 0, q.element_size())
        res = paged_attention_sparse_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                         skip_scale=skip_scale, block_n=block_n, block_m=block_m)
        if counters is not None:
            counters += torch.tensor([res.skipped_tiles, res.visited_tiles], dtype=counters.dtype,
                                     device=counters.device)
        return res.out
    if max_q_len <= MAX_DECODE_Q_LEN:
        from slipstream.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                      max_q_len=max_q_len, skip_scale=skip_scale, counters=counters)
    from slipstream.kernels.prefill_attention import paged_prefill_attention

    return paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                   max_q_len=max_q_len, skip_scale=skip_scale, counters=counters)
