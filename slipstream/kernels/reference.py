"""Torch reference implementations of the paged-attention ops (float32 math, any device).

They define the contract the Triton kernels must meet, and they are the CPU path of the engine.

Paged KV cache, per layer: `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A sequence's token at position p lives in block `block_table[p // block_size]` at
offset `p % block_size`; its flat slot is `block * block_size + offset`.

One attention call serves every phase (prefill, chunked prefill, decode, speculative verify):
the step's query tokens of all sequences are packed along the first dimension; sequence s owns
query rows `cu_seqlens_q[s]:cu_seqlens_q[s+1]` (q_len_s of them), its context after this step is
`seq_lens[s]` tokens (cached ones plus the new ones, whose K/V were stored first), and query row i
of sequence s sits at position `seq_lens[s] - q_len_s + i`, attending causally to keys 0..that
position.
"""

from __future__ import annotations

import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, kv_heads, head_dim] to their flat cache slots [T] (slot < 0: skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from the paged cache: [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    return cache[block_table[:n_blocks].long()].reshape(-1, *cache.shape[2:])[:length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Causal attention of packed queries [T, heads, head_dim] over the paged cache -> [T, heads, head_dim].

    GQA: query head h reads kv head h // (heads // kv_heads). Math in float32, output in q.dtype.
    """
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for s in range(len(lens)):
        q_s = q[cu[s] : cu[s + 1]].float()  # [n, H, D]
        n, L = q_s.shape[0], lens[s]
        if n == 0:
            continue
        k = gather_kv(k_cache, block_tables[s], L).float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = gather_kv(v_cache, block_tables[s], L).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", q_s, k) * scale
        q_pos = torch.arange(L - n, L, device=q.device)[:, None]
        k_pos = torch.arange(L, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[cu[s] : cu[s + 1]] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).to(q.dtype)
    return out
