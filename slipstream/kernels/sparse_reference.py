"""Torch reference of skip-softmax (BLASST) paged attention: the kernels' tile-skip decisions, in float32.

The Triton kernels walk key tiles of `block_n` tokens (tile t holds keys t*block_n .. t*block_n +
block_n - 1) with an online softmax. For every tile they compute the base-2 scores
s = (q . k) * scale * log2(e), masked causally, and each query row's tile maximum m_tile. The tile
is skipped (no exponentials, no V load, no P.V) when every row of the program's query tile has
m_tile < m_running + log2(lambda) (float32, this exact form), where m_running is the maximum over
the tiles that program has not skipped so far (and its starting value, below) and
lambda = skip_scale / seq_len. A row that sees no key of the tile (m_tile = -inf) never blocks the
skip; a program starting from m_running = -inf never skips its first tile.

Which rows share a decision, and where the running max starts, depends on the kernel:

- decode (`block_m=None`): one query tile = all query tokens of a sequence x the query heads of one
  kv head; the context's tiles are cut into split-K parts (`split_bounds`); the first part starts
  from m_running = -inf, every later part from each row's score of key 0 (so it may skip its
  first tile);
- prefill (`block_m=B`): one query tile = B consecutive query tokens of one query head; it visits
  the key tiles up to its last row's position, from m_running = -inf.

This module replays exactly that walk, then computes the output as the softmax restricted to the
kept keys (which is what the online softmax over the kept tiles yields), and the weight the skipped
keys held in the dense softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slipstream.kernels.reference import gather_kv

LOG2E = 1.0 / math.log(2.0)


@dataclass
class SparseAttention:
    out: torch.Tensor  # [T, heads, head_dim], q.dtype
    skipped_tiles: int  # over all programs (query tile x split)
    visited_tiles: int
    skipped_mass: torch.Tensor  # [T, heads] float32: dense softmax weight on the skipped keys, per query row

    @property
    def sparsity(self) -> float:
        return self.skipped_tiles / max(self.visited_tiles, 1)


def split_bounds(n_tiles: int, num_splits: int, min_tiles_per_split: int) -> list[tuple[int, int]]:
    """The decode kernel's split-K parts of one sequence's key tiles: [(first tile, end tile)], non-empty."""
    per_split = max(-(-n_tiles // num_splits), min_tiles_per_split)
    return [(b, min(b + per_split, n_tiles)) for b in range(0, n_tiles, per_split)]


def paged_attention_sparse_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                               scale: float, *, skip_scale: float, block_n: int, block_m: int | None = None,
                               num_splits: int = 1, min_tiles_per_split: int = 1,
                               seed_splits: bool = True) -> SparseAttention:
    """Skip-softmax attention with the decode (`block_m=None`) or prefill (`block_m`) kernel's tiling.
    `seed_splits=False`: later decode parts start from -inf too (what the seeding buys)."""
    if block_m is not None and num_splits != 1:
        raise ValueError("the prefill kernel has no split-K")
    heads, kv_heads, dim = q.shape[1], k_cache.shape[2], q.shape[2]
    group = heads // kv_heads
    qk_scale = torch.tensor(float(scale) * LOG2E, dtype=torch.float32)
    out = torch.empty_like(q)
    skipped_mass = torch.zeros(q.shape[0], heads, dtype=torch.float32, device=q.device)
    skipped = visited = 0
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    neg_inf = float("-inf")
    for s_idx, L in enumerate(lens):
        n = cu[s_idx + 1] - cu[s_idx]
        if n == 0:
            continue
        q_s = q[cu[s_idx] : cu[s_idx + 1]].float()  # [n, H, D]
        k = gather_kv(k_cache, block_tables[s_idx], L).float()  # [L, KVH, D]
        v = gather_kv(v_cache, block_tables[s_idx], L).float().repeat_interleave(group, dim=1)  # [L, H, D]
        # Base-2 scores [H, n, L], rounded like the kernels: float32 dot, then times float32 scale*log2(e).
        scores = torch.einsum("nkgd,lkd->kgnl", q_s.view(n, kv_heads, group, dim), k).reshape(heads, n, L)
        scores = scores * qk_scale
        q_pos = torch.arange(L - n, L, device=q.device)
        visible = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
        scores = scores.masked_fill(~visible, neg_inf)

        # Query tiles [Q, R, L] (R rows share one decision) and how many key tiles each visits.
        if block_m is None:
            tiles = scores.view(kv_heads, group * n, L)
            n_key_tiles = torch.full((kv_heads,), -(-L // block_n))
        else:
            n_q = -(-n // block_m)
            pad = n_q * block_m - n
            padded = torch.cat([scores, scores.new_full((heads, pad, L), neg_inf)], 1)
            tiles = padded.view(heads * n_q, block_m, L)
            last_row = torch.clamp(torch.arange(1, n_q + 1) * block_m, max=n) - 1
            kv_end = L - n + last_row + 1
            n_key_tiles = (-(-kv_end // block_n)).repeat(heads)
        n_qt = tiles.shape[0]
        kept = torch.ones(n_qt, L, dtype=torch.bool, device=q.device)
        total = -(-L // block_n)
        starts = {0} if block_m is not None else {b for b, _ in split_bounds(total, num_splits, min_tiles_per_split)}
        log2_lambda = torch.log2(torch.tensor(skip_scale, dtype=torch.float32) / L) if skip_scale > 0 else None
        for t in range(total):
            if t in starts:  # tile 0 always is one; a later decode part starts from key 0's scores
                m_run = (tiles[:, :, 0].clone() if t > 0 and seed_splits
                         else torch.full(tiles.shape[:2], neg_inf, device=q.device))
            active = t < n_key_tiles.to(q.device)  # [Q]
            if not bool(active.any()):
                break
            sl = slice(t * block_n, min((t + 1) * block_n, L))
            m_tile = tiles[:, :, sl].amax(-1)  # [Q, R]
            visited += int(active.sum())
            if log2_lambda is not None:
                row_skip = (m_tile < m_run + log2_lambda) | (m_tile == neg_inf)
                tile_skip = row_skip.all(-1) & active
            else:
                tile_skip = torch.zeros_like(active)
            skipped += int(tile_skip.sum())
            kept[tile_skip, sl] = False
            m_run = torch.where((tile_skip | ~active)[:, None], m_run, torch.maximum(m_run, m_tile))

        # Back to [H, n, L]: which keys each query row kept.
        if block_m is None:
            kept_rows = kept[:, None, None, :].expand(kv_heads, group, n, L).reshape(heads, n, L)
        else:
            kept_rows = kept.view(heads, n_q, 1, L).expand(heads, n_q, block_m, L).reshape(heads, -1, L)[:, :n]
        w = torch.exp2(scores - scores.amax(-1, keepdim=True))  # dense weights, 0 where invisible
        w_kept = w.masked_fill(~kept_rows, 0.0)
        out[cu[s_idx] : cu[s_idx + 1]] = (torch.einsum("hnl,lhd->nhd", w_kept, v)
                                          / w_kept.sum(-1).transpose(0, 1)[..., None]).to(q.dtype)
        w_skipped = w.masked_fill(kept_rows, 0.0).sum(-1)
        skipped_mass[cu[s_idx] : cu[s_idx + 1]] = (w_skipped / w.sum(-1)).transpose(0, 1)
    return SparseAttention(out, skipped, visited, skipped_mass)
