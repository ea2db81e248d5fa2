"""Skip-softmax (BLASST) in both kernels: exact dense fallback, the reference's skip decisions, error bound.

Error bound. Take one query row, scores x_j (natural units), final maximum m, weights
p_j = exp(x_j - m) (so the largest is 1 and Z = sum_j p_j >= 1). A tile is skipped only when its
maximum m_tile satisfies m_tile - m_run < ln(lambda), where m_run <= m is the running maximum of
the tiles kept so far, so every key j of a skipped tile has p_j <= exp(m_tile - m) <= lambda. The
dense output is O = sum_j p_j v_j / Z, the sparse one O' = sum_kept p_j v_j / Z_kept; with
Z_skip = Z - Z_kept,

    O - O' = sum_skipped p_j (v_j - O') / Z,   so   |O - O'| <= (Z_skip / Z) * max_j |v_j - O'|
                                                              <= mass * 2 * max|v|,

where mass = Z_skip / Z <= n_skipped * lambda <= seq_len * skip_scale / seq_len = skip_scale.
The test asserts mass <= skip_scale (from the reference's own accounting), the per-row bound
|O - O'| <= 2 max|v| mass + fp tolerance, and hence |O - O'| <= 2 max|v| skip_scale + tolerance.
"""

import pytest
import torch

from slipstream.kernels import paged_attention
from slipstream.kernels.attention import decode_block_n
from slipstream.kernels.paged_attention import paged_decode_attention
from slipstream.kernels.prefill_attention import paged_prefill_attention
from slipstream.kernels.sparse_reference import paged_attention_sparse_ref, split_bounds

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
HOT, WARM, HOTTER = 12.0, 9.0, 13.0  # scores (natural units) of the planted keys; random keys score ~0


def _planted(paged_batch, lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed):
    """Queries of one kv head all point along a direction u; most keys are small noise, a few are planted
    along u: 'hot' ones at positions 0 and 5 (tile 0), a 'warm' one at 70 (scores HOT - 3: its tile is
    kept), a 'hotter' one at 150 (raises the running max). With lambda = 1/seq_len (ln lambda ~ -5),
    tiles of noise (about -11 below the max) are skipped and the others kept, far from the threshold."""
    gen = torch.Generator().manual_seed(seed)
    group = heads // kv_heads
    u = torch.nn.functional.normalize(torch.randn(kv_heads, head_dim, generator=gen), dim=-1)
    a = 4.0  # query norm along u
    keys, values, queries = [], [], []
    for L, n in zip(lens, q_lens):
        k = 0.5 * torch.randn(L, kv_heads, head_dim, generator=gen)
        for p, score in ((0, HOT), (5, HOT), (70, WARM), (150, HOTTER)):
            if p < L:
                k[p] = score * head_dim**0.5 / a * u
        keys.append(k)
        values.append(torch.randn(L, kv_heads, head_dim, generator=gen))
        qu = a * u.repeat_interleave(group, 0)  # [heads, D]
        queries.append(qu + 0.3 * torch.randn(n, heads, head_dim, generator=gen))
    args = paged_batch(lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed=seed,
                       keys=keys, values=values, queries=queries)
    vmax = max(v.to(dtype).float().abs().max().item() for v in values)
    return args, vmax


def _check_sparse(out, counters, dense, ref, dtype, skip_scale, vmax):
    tol = TOL[dtype]
    # The kernel's skip decisions are the reference's: same counts, same output.
    assert counters.tolist() == [ref.skipped_tiles, ref.visited_tiles]
    assert ref.skipped_tiles > 0
    assert (out.float() - ref.out.float()).abs().max().item() <= tol
    # Error vs dense within the bound derived in the module docstring.
    assert ref.skipped_mass.max().item() <= skip_scale
    err = (out.float() - dense.float()).abs().amax(-1)  # [T, heads]
    assert (err <= 2 * vmax * ref.skipped_mass + tol).all()
    assert err.max().item() <= 2 * vmax * skip_scale + tol
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_skips_what_the_reference_skips(paged_batch, dtype, num_splits):
    lens, q_lens = [200, 90, 230, 33], [1, 16, 4, 2]
    heads, kv_heads, block_n = 4, 2, 16
    args, vmax = _planted(paged_batch, lens, q_lens, heads, kv_heads, 64, 16, dtype, seed=num_splits)
    dense = paged_decode_attention(*args, 0.125, max_q_len=16, block_n=block_n, num_splits=num_splits,
                                   min_tiles_per_split=1)
    skip_scale = 1.0
    counters = torch.zeros(2, dtype=torch.int32)
    out = paged_decode_attention(*args, 0.125, max_q_len=16, skip_scale=skip_scale, counters=counters,
                                 block_n=block_n, num_splits=num_splits, min_tiles_per_split=1)
    ref = paged_attention_sparse_ref(*args, 0.125, skip_scale=skip_scale, block_n=block_n,
                                     num_splits=num_splits, min_tiles_per_split=1)
    err = _check_sparse(out, counters, dense, ref, dtype, skip_scale, vmax)
    # Most noise tiles go (200 tokens -> 13 tiles, 10 skipped without splits), with splits too:
    # a later split starts from key 0's (hot) score, so its first tile can be skipped.
    assert ref.sparsity > 0.5
    if num_splits == 3:
        unseeded = paged_attention_sparse_ref(*args, 0.125, skip_scale=skip_scale, block_n=block_n,
                                              num_splits=num_splits, min_tiles_per_split=1, seed_splits=False)
        assert ref.skipped_tiles > unseeded.skipped_tiles
    if dtype == torch.float32:
        assert err.max().item() > 20 * TOL[dtype]  # skipping really changed the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_skips_what_the_reference_skips(paged_batch, dtype):
    lens, q_lens = [200, 180, 40], [64, 180, 40]  # a chunk over a prefix, full prefills
    heads, kv_heads, block_m, block_n = 2, 1, 32, 16
    args, vmax = _planted(paged_batch, lens, q_lens, heads, kv_heads, 64, 32, dtype, seed=7)
    dense = paged_prefill_attention(*args, 0.125, max_q_len=180, block_m=block_m, block_n=block_n)
    skip_scale = 1.0
    counters = torch.zeros(2, dtype=torch.int64)
    out = paged_prefill_attention(*args, 0.125, max_q_len=180, skip_scale=skip_scale, counters=counters,
                                  block_m=block_m, block_n=block_n)
    ref = paged_attention_sparse_ref(*args, 0.125, skip_scale=skip_scale, block_n=block_n, block_m=block_m)
    err = _check_sparse(out, counters, dense, ref, dtype, skip_scale, vmax)
    assert ref.sparsity > 0.3
    if dtype == torch.float32:
        assert err.max().item() > 20 * TOL[dtype]


@pytest.mark.parametrize("decode", [True, False])
def test_threshold_is_per_sequence(paged_batch, decode):
    # Noise-free scores: key 0 scores 12, one key in every later 16-key tile scores 6.5, the rest 0, so
    # every later tile sits 5.5 below the running max. lambda = 1 / seq_len: ln(1/64) = -4.16 skips those
    # tiles in the 64-token sequence, ln(1/1024) = -6.93 keeps them in the 1024-token one.
    heads, kv_heads, D = 2, 2, 32
    u = torch.zeros(kv_heads, D)
    u[:, 0] = 1.0
    lens, q_lens = [64, 1024], [1, 1] if decode else [64, 1024]
    keys = []
    for L in lens:
        k = torch.zeros(L, kv_heads, D)
        k[0] = 12.0 * u
        k[16 + 3 :: 16] = 6.5 * u
        keys.append(k)
    queries = [u.repeat_interleave(heads // kv_heads, 0).expand(n, heads, D) for n in q_lens]
    args = paged_batch(lens, q_lens, heads, kv_heads, D, 16, seed=0, keys=keys, queries=queries)
    counters = torch.zeros(2, dtype=torch.int32)
    if decode:
        paged_decode_attention(*args, 1.0, max_q_len=1, skip_scale=1.0, counters=counters, block_n=16, num_splits=1)
        # 64 tokens: tiles 1..3 skipped per kv head; 1024 tokens: none. Visited: (4 + 64) x 2 kv heads.
        assert counters.tolist() == [3 * 2, (4 + 64) * 2]
    else:
        paged_prefill_attention(*args, 1.0, max_q_len=1024, skip_scale=1.0, counters=counters, block_m=64,
                                block_n=16)
        ref = paged_attention_sparse_ref(*args, 1.0, skip_scale=1.0, block_n=16, block_m=64)
        assert counters.tolist() == [ref.skipped_tiles, ref.visited_tiles]
        # The 64-token prompt is one query tile per head: its tiles 1..3 go. No tile of the long one does.
        assert ref.skipped_tiles == 3 * heads


@pytest.mark.parametrize("max_q_len", [16, 40])
def test_zero_skip_scale_is_the_dense_kernel_exactly(paged_batch, max_q_len):
    lens, q_lens = [120, 77], [max_q_len, 3]
    args, _ = _planted(paged_batch, lens, q_lens, 4, 2, 64, 16, torch.float32, seed=3)
    kernel = paged_decode_attention if max_q_len <= 16 else paged_prefill_attention
    # (decode: the split-K parts skip-softmax would use by default, so the tilings match)
    blocks = {"block_n": 16, "min_tiles_per_split": 4} if max_q_len <= 16 else {"block_m": 16, "block_n": 16}
    dense = kernel(*args, 0.125, max_q_len=max_q_len, **blocks)
    counters = torch.zeros(2, dtype=torch.int32)
    assert torch.equal(kernel(*args, 0.125, max_q_len=max_q_len, skip_scale=0.0, counters=counters, **blocks),
                       dense)
    assert counters[0] == 0 and counters[1] > 0
    # A threshold too small to skip anything runs the skip branch with every tile kept: same bits.
    counters.zero_()
    tiny = kernel(*args, 0.125, max_q_len=max_q_len, skip_scale=1e-30, counters=counters, **blocks)
    assert torch.equal(tiny, dense) and counters[0] == 0
    # Through the dispatcher (default tiles).
    assert torch.equal(paged_attention(*args, 0.125, max_q_len=max_q_len),
                       paged_attention(*args, 0.125, max_q_len=max_q_len, skip_scale=0.0))


def test_dispatcher_cpu_path_uses_the_sparse_reference(paged_batch, monkeypatch):
    args, _ = _planted(paged_batch, [300, 140], [1, 2], 4, 2, 64, 16, torch.float32, seed=5)
    kernel_counters = torch.zeros(2, dtype=torch.int64)
    kernel = paged_attention(*args, 0.125, max_q_len=2, skip_scale=1.0, counters=kernel_counters)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    counters = torch.zeros(2, dtype=torch.int64)
    out = paged_attention(*args, 0.125, max_q_len=2, skip_scale=1.0, counters=counters)
    ref = paged_attention_sparse_ref(*args, 0.125, skip_scale=1.0, block_n=decode_block_n(True))
    assert torch.equal(out, ref.out)
    assert counters.tolist() == [ref.skipped_tiles, ref.visited_tiles] and ref.skipped_tiles > 0
    # One split on this short block table: the kernel took the same decisions.
    assert counters.tolist() == kernel_counters.tolist()
    assert (kernel - out).abs().max().item() <= TOL[torch.float32]


def test_sparse_reference_without_skipping_is_dense_attention(paged_batch):
    from slipstream.kernels import paged_attention_ref

    args = paged_batch([70, 33], [5, 33], 4, 2, 32, 16, seed=1)
    dense = paged_attention_ref(*args, 0.2)
    for tiling in ({"block_n": 16, "num_splits": 3}, {"block_n": 16, "block_m": 16}):
        ref = paged_attention_sparse_ref(*args, 0.2, skip_scale=0.0, **tiling)
        assert ref.skipped_tiles == 0 and (ref.skipped_mass == 0).all()
        assert torch.allclose(ref.out, dense, atol=1e-5)
    # Decode visits every context tile once per kv head: (5 + 3) tiles x 2 kv heads.
    assert paged_attention_sparse_ref(*args, 0.2, skip_scale=0.0, block_n=16).visited_tiles == 16


def test_split_bounds():
    assert split_bounds(19, 3, 1) == [(0, 7), (7, 14), (14, 19)]
    assert split_bounds(19, 3, 8) == [(0, 8), (8, 16), (16, 19)]
    assert split_bounds(1, 3, 1) == [(0, 1)]
    assert split_bounds(4, 8, 4) == [(0, 4)]
