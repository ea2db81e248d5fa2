import torch
import torch.nn.functional as F

from slipstream.kernels.reference import gather_kv, paged_attention_ref, store_kv


def _paged(seqs_k, seqs_v, block_size, num_blocks, gen):
    """Scatter per-sequence K/V into a cache through shuffled, non-contiguous block tables."""
    kvh, d = seqs_k[0].shape[1:]
    k_cache = torch.zeros(num_blocks, block_size, kvh, d)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-k.shape[0] // block_size) for k in seqs_k) + 1
    tables = torch.full((len(seqs_k), max_blocks), -1, dtype=torch.int32)
    for s, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        n_blocks = -(-k.shape[0] // block_size)
        tables[s, :n_blocks] = torch.tensor([free.pop() for _ in range(n_blocks)], dtype=torch.int32)
        pos = torch.arange(k.shape[0])
        slots = tables[s, pos // block_size].long() * block_size + pos % block_size
        store_kv(k, v, k_cache, v_cache, slots)
    return k_cache, v_cache, tables


def test_matches_sdpa_for_prefill_chunks_and_decode_with_gqa():
    gen = torch.Generator().manual_seed(0)
    H, KVH, D, bs = 6, 2, 16, 4
    lens, q_lens = [9, 1, 17, 5], [9, 1, 3, 1]  # full prefill, decode, chunk over a prefix, decode
    ks = [torch.randn(L, KVH, D, generator=gen) for L in lens]
    vs = [torch.randn(L, KVH, D, generator=gen) for L in lens]
    qs = [torch.randn(n, H, D, generator=gen) for n in q_lens]
    k_cache, v_cache, tables = _paged(ks, vs, bs, 32, gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = paged_attention_ref(torch.cat(qs), k_cache, v_cache, cu, torch.tensor(lens, dtype=torch.int32), tables, 0.25)
    for s, (L, n) in enumerate(zip(lens, q_lens)):
        k = ks[s].repeat_interleave(H // KVH, 1).transpose(0, 1)
        v = vs[s].repeat_interleave(H // KVH, 1).transpose(0, 1)
        mask = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]
        ref = F.scaled_dot_product_attention(qs[s].transpose(0, 1), k, v, attn_mask=mask, scale=0.25).transpose(0, 1)
        assert torch.allclose(out[cu[s] : cu[s + 1]], ref, atol=1e-5)


def test_store_and_gather_round_trip_and_negative_slots_are_skipped():
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros_like(k_cache)
    k = torch.arange(9.0).reshape(3, 1, 3)
    store_kv(k, -k, k_cache, v_cache, torch.tensor([5, 0, -1]))
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(k_cache[0, 0], k[1])
    assert k_cache.abs().sum() == k[:2].abs().sum()  # the -1 slot wrote nothing
    table = torch.tensor([0, 2], dtype=torch.int32)
    assert torch.equal(gather_kv(v_cache, table, 4)[[0, 3]], -k[[1, 0]])


def test_batched_torch_path_equals_the_reference():
    from slipstream.kernels.reference import paged_attention_torch

    gen = torch.Generator().manual_seed(1)
    H, KVH, D, bs = 8, 2, 16, 4
    lens, q_lens = [13, 1, 30, 6, 2], [13, 1, 5, 1, 2]
    ks = [torch.randn(L, KVH, D, generator=gen) for L in lens]
    vs = [torch.randn(L, KVH, D, generator=gen) for L in lens]
    k_cache, v_cache, tables = _paged(ks, vs, bs, 64, gen)
    q = torch.randn(sum(q_lens), H, D, generator=gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.3)
    got = paged_attention_torch(q, k_cache, v_cache, cu, seq_lens, tables, 0.3)
    assert torch.allclose(got, ref, atol=1e-5)
