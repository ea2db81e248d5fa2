"""Prefill / chunked-prefill kernel vs the torch reference, in Triton's interpreter."""

import pytest
import torch

from slipstream.kernels import paged_attention, paged_attention_ref
from slipstream.kernels.prefill_attention import paged_prefill_attention

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], err


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,head_dim,page,block_m,block_n",
    [
        (torch.float32, 2, 2, 64, 16, 32, 32),  # MHA; key tiles span 2 pages
        (torch.float16, 4, 2, 64, 32, 16, 16),  # GQA 2; key tiles inside a page
        (torch.float32, 4, 1, 128, 16, 32, 64),  # GQA 4, head_dim 128; a key tile spans 4 pages
        (torch.float16, 4, 1, 128, 16, 64, 32),
    ],
)
def test_prefill_and_chunked_prefill_match_reference(paged_batch, dtype, heads, kv_heads, head_dim, page,
                                                     block_m, block_n):
    # Full prefills (ragged, not tile multiples), a chunk over a cached prefix, an idle sequence,
    # a decode token riding along.
    lens = [45, 100, 7, 30, 60]
    q_lens = [45, 37, 7, 0, 1]
    args = paged_batch(lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed=block_m + head_dim)
    ref = paged_attention_ref(*args, head_dim**-0.5)
    out = paged_prefill_attention(*args, head_dim**-0.5, max_q_len=45, block_m=block_m, block_n=block_n)
    _check(out, ref, dtype)


def test_dispatcher_routes_long_chunks_to_prefill_with_default_tiles(paged_batch, monkeypatch):
    lens, q_lens = [150, 90], [70, 20]  # max_q_len 70, head_dim 64: 128-row query tiles, 128-key tiles
    args = paged_batch(lens, q_lens, 2, 1, 64, 16, torch.float16, seed=11)
    out = paged_attention(*args, 0.125, max_q_len=70)
    assert torch.equal(out, paged_prefill_attention(*args, 0.125, max_q_len=70, block_m=128, block_n=128))
    _check(out, paged_attention_ref(*args, 0.125), torch.float16)
    monkeypatch.delenv("TRITON_INTERPRET")
    from slipstream.kernels.reference import paged_attention_torch

    assert torch.equal(paged_attention(*args, 0.125, max_q_len=70), paged_attention_torch(*args, 0.125))


def test_visits_only_tiles_below_the_diagonal(paged_batch):
    # Counters count visited key tiles: query tile [m0, m0+16) of a full prefill visits
    # ceil((m0 + 16) / 16) key tiles; with a 64-token prefix every tile sees 4 more.
    q, k, v, cu, lens, tables = paged_batch([64, 64 + 48], [64, 48], 1, 1, 16, 16, seed=2)
    counters = torch.zeros(2, dtype=torch.int64)
    paged_prefill_attention(q, k, v, cu, lens, tables, 0.25, max_q_len=64, block_m=16, block_n=16,
                            counters=counters)
    assert counters.tolist() == [0, (1 + 2 + 3 + 4) + (5 + 6 + 7)]
