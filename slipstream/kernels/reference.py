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


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """The same op as `paged_attention_ref`, batched: one padded SDPA call for all sequences.

    The CPU path of the engine. Each sequence's blocks are gathered into a padded [S, L, kv_heads,
    head_dim] view; the query heads of a GQA group are folded into the query-length dimension so
    K/V are never repeated. Padded query rows are computed and dropped.
    """
    S = seq_lens.shape[0]
    T, H, D = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = H // kv_heads
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    max_q, max_len = int(q_lens.max()), int(seq_lens.max())
    n_blocks = -(-max_len // block_size)
    tables = block_tables[:, :n_blocks].long().clamp(min=0)  # unused entries are masked below
    L = n_blocks * block_size
    k = k_cache[tables].reshape(S, L, kv_heads, D).transpose(1, 2)  # [S, kvh, L, D]
    v = v_cache[tables].reshape(S, L, kv_heads, D).transpose(1, 2)
    rows = torch.arange(T, device=q.device)
    owner = torch.searchsorted(cu_seqlens_q[1:].long(), rows, right=True)  # sequence of each packed row
    row = rows - cu_seqlens_q[:-1].long()[owner]
    qp = q.new_zeros(S, max_q, H, D)
    qp[owner, row] = q
    # [S, max_q, kvh, group, D] -> [S, kvh, max_q * group, D]
    qh = qp.view(S, max_q, kv_heads, group, D).permute(0, 2, 1, 3, 4).reshape(S, kv_heads, max_q * group, D)
    q_pos = (seq_lens.long() - q_lens)[:, None] + torch.arange(max_q, device=q.device)[None, :]  # [S, max_q]
    allowed = torch.arange(L, device=q.device)[None, None, :] <= q_pos[:, :, None]  # [S, max_q, L]
    mask = allowed[:, :, None, :].expand(S, max_q, group, L).reshape(S, 1, max_q * group, L)
    out = torch.nn.functional.scaled_dot_product_attention(qh.to(k.dtype), k, v, attn_mask=mask, scale=scale)
    out = out.reshape(S, kv_heads, max_q, group, D).permute(0, 2, 1, 3, 4).reshape(S, max_q, H, D)
    return out[owner, row].to(q.dtype)
