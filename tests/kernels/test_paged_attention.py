"""Decode / extend kernel (1..16 query tokens per sequence) vs the torch reference, in Triton's interpreter."""

import pytest
import torch

from slipstream.kernels import paged_attention, paged_attention_ref
from slipstream.kernels.paged_attention import choose_num_splits, paged_decode_attention
from slipstream.kernels.prefill_attention import paged_prefill_attention

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], err


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,head_dim,page,block_n",
    [
        (torch.float32, 4, 4, 64, 16, 64),  # MHA; a key tile spans 4 pages
        (torch.float16, 4, 2, 64, 16, 32),  # GQA 2
        (torch.float32, 8, 2, 128, 32, 16),  # GQA 4, head_dim 128; a key tile inside a page
        (torch.float16, 6, 2, 128, 16, 16),  # GQA 3 (SmolLM2's 9/3 heads)
    ],
)
def test_mixed_decode_and_verify_batch_matches_reference(paged_batch, dtype, heads, kv_heads, head_dim, page,
                                                         block_n):
    # Ragged contexts; q_len 1 (decode), 16 (speculative verify), the whole sequence, and one idle sequence.
    lens = [1, 45, 16, 130, 77, 9]
    q_lens = [1, 16, 16, 5, 1, 0]
    args = paged_batch(lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed=heads + head_dim)
    ref = paged_attention_ref(*args, head_dim**-0.5)
    out = paged_decode_attention(*args, head_dim**-0.5, max_q_len=16, block_n=block_n, num_splits=1)
    _check(out, ref, dtype)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_matches_reference(paged_batch, num_splits, dtype):
    # 300 tokens = 19 tiles of 16: 3 splits cut at 7 and 14 tiles. 20 tokens = 2 tiles, one per part:
    # 12 of its 16 verify rows see no key of the second part. The 1-tile sequence has one part.
    lens = [300, 20, 123, 8]
    q_lens = [16, 16, 1, 8]
    args = paged_batch(lens, q_lens, 4, 2, 64, 16, dtype, seed=num_splits)
    ref = paged_attention_ref(*args, 0.125)
    out = paged_decode_attention(*args, 0.125, max_q_len=16, block_n=16, num_splits=num_splits,
                                 min_tiles_per_split=1)
    _check(out, ref, dtype)
    # min_tiles_per_split keeps short contexts in one part: same answer.
    out = paged_decode_attention(*args, 0.125, max_q_len=16, block_n=16, num_splits=num_splits,
                                 min_tiles_per_split=8)
    _check(out, ref, dtype)


def test_split_heuristic():
    # One tile never splits; few sequences split to fill the GPU, down to one tile a part; a big batch needs none.
    assert choose_num_splits(batch=1, kv_heads=8, max_context=64, block_n=64, num_sms=132) == 1
    assert choose_num_splits(batch=1, kv_heads=2, max_context=448, block_n=64, num_sms=132) == 7
    assert choose_num_splits(batch=1, kv_heads=8, max_context=65536, block_n=64, num_sms=132) == 64
    assert choose_num_splits(batch=4, kv_heads=8, max_context=8192, block_n=64, num_sms=132) == 33
    assert choose_num_splits(batch=256, kv_heads=8, max_context=65536, block_n=64, num_sms=132) == 1
    # ... and never into parts shorter than min_tiles_per_split tiles.
    assert choose_num_splits(batch=1, kv_heads=1, max_context=1024, block_n=64, num_sms=132,
                             min_tiles_per_split=4) == 4
    # Knowing how many programs fit on an SM, dense decode fills at most one wave: 5 per SM on 132
    # SMs hold 660 programs (8 kv heads: 82 splits for one sequence, capped at 64; 10 for 8; 2 for
    # 32; one for 64 or more); 2 per SM (a verification step's bigger tile) hold 264.
    for batch, resident, splits in ((1, 5, 64), (8, 5, 10), (32, 5, 2), (64, 5, 1), (256, 5, 1), (8, 2, 4), (4, 2, 8)):
        assert choose_num_splits(batch=batch, kv_heads=8, max_context=32768, block_n=64, num_sms=132,
                                 resident_per_sm=resident) == splits, (batch, resident)
    assert choose_num_splits(batch=1, kv_heads=8, max_context=640, block_n=64, num_sms=132, resident_per_sm=5) == 10
    # Skip-softmax aims at more programs per SM (its V loads wait on the skip test), in a power of
    # two of parts of at least two tiles, up to 128 parts.
    assert choose_num_splits(batch=32, kv_heads=8, max_context=65536, block_n=64, num_sms=132) == 5
    assert choose_num_splits(batch=32, kv_heads=8, max_context=65536, block_n=64, num_sms=132, skip=True) == 16
    assert choose_num_splits(batch=1, kv_heads=8, max_context=65536, block_n=128, num_sms=132, skip=True) == 128
    assert choose_num_splits(batch=8, kv_heads=8, max_context=8192, block_n=128, num_sms=132, skip=True) == 32
    assert choose_num_splits(batch=1, kv_heads=2, max_context=448, block_n=64, num_sms=132, skip=True) == 2


def test_heuristic_split_count_strided_queries_and_int64_metadata(paged_batch):
    # Default split count (a short block table: 1 part), queries that are a strided view, and
    # int64 cu_seqlens_q / seq_lens / block_tables.
    lens, q_lens = [40, 70], [2, 1]
    q, *rest = paged_batch(lens, q_lens, 4, 2, 32, 16, seed=3)
    rest = rest[:2] + [x.long() for x in rest[2:]]
    wide = torch.randn(q.shape[0], 4, 64)
    wide[..., ::2] = q
    q_view = wide[..., ::2]
    assert not q_view.is_contiguous()
    ref = paged_attention_ref(q, *rest, 0.2)
    _check(paged_decode_attention(q_view, *rest, 0.2, max_q_len=2), ref, torch.float32)


def test_dispatcher_routes_decode_and_keeps_torch_path_on_cpu(paged_batch, monkeypatch):
    args = paged_batch([50, 20], [4, 16], 4, 2, 64, 16, seed=5)
    kernel = paged_decode_attention(*args, 0.125, max_q_len=16)
    assert torch.equal(paged_attention(*args, 0.125, max_q_len=16), kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from slipstream.kernels.reference import paged_attention_torch

    cpu = paged_attention(*args, 0.125, max_q_len=16)
    assert torch.equal(cpu, paged_attention_torch(*args, 0.125))  # the batched torch path on CPU
    assert torch.allclose(cpu, paged_attention_ref(*args, 0.125), atol=1e-5)


def test_rejects_bad_arguments(paged_batch):
    args = paged_batch([20], [1], 4, 2, 64, 16)
    with pytest.raises(ValueError, match="max_q_len must be in 0..16"):
        paged_decode_attention(*args, 0.125, max_q_len=17)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        paged_decode_attention(*args, 0.125, max_q_len=1, block_n=24)


@pytest.mark.parametrize("wrapper", [paged_decode_attention, paged_prefill_attention])
def test_both_wrappers_reject_what_the_kernels_cannot_take(paged_batch, wrapper):
    args = paged_batch([20], [4], 4, 2, 64, 16)
    with pytest.raises(ValueError, match="counters must be"):
        wrapper(*args, 0.125, max_q_len=4, counters=torch.zeros(3, dtype=torch.int32))
    for scale in (0.0, -0.125, float("nan")):  # the kernels scale row maxima: a positive scale only
        with pytest.raises(ValueError, match="scale must be > 0"):
            wrapper(*args, scale, max_q_len=4)
    with pytest.raises(ValueError, match="skip_scale must be >= 0"):
        wrapper(*args, 0.125, max_q_len=4, skip_scale=-1.0)
    q, k, v, *rest = args
    with pytest.raises(ValueError, match="must share a dtype"):
        wrapper(q.half(), k, v, *rest, 0.125, max_q_len=4)
    for heads, kv_heads, head_dim in ((4, 2, 48), (3, 2, 64)):  # not a power of two; heads % kv_heads
        with pytest.raises(ValueError, match="need head_dim a power of two"):
            wrapper(*paged_batch([20], [4], heads, kv_heads, head_dim, 16), 0.125, max_q_len=4)
