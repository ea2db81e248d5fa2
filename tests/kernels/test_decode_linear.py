"""The decode projections (Triton, run in the interpreter) against torch: each way `linear` times,
and `norm_linear`'s fused norm prologue / SwiGLU epilogue against the separate ops."""

import pytest
import torch

from slipstream.kernels import decode_linear
from slipstream.kernels.fused_ops import rms_norm_torch, rope_cos_sin_torch, silu_mul_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,bias", [(1, 40, 70, True), (5, 300, 64, False), (16, 33, 300, True)])
def test_small_m_linear_matches_torch(dtype, M, N, K, bias):
    g = torch.Generator().manual_seed(M * N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = decode_linear.linear(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = dict(atol=2e-2, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y.float(), ref, **tol)
    assert y.dtype == dtype
    # more rows than a decode step: torch's matmul
    assert torch.equal(decode_linear.linear(x.repeat(20, 1), w, b)[:M], torch.nn.functional.linear(x.repeat(20, 1), w, b)[:M])


def test_linear_out_dtype_rounds_like_the_weights_then_casts():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 96, generator=g).half(), torch.randn(50, 96, generator=g).half()
    y = decode_linear.linear(x, w, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert torch.equal(y, y.half().float())  # holds only values a half can hold
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), w.float()).half().float(), atol=2e-2,
                               rtol=2e-3)
    big = decode_linear.linear(x.repeat(10, 1), w, out_dtype=torch.float32)  # F.linear's path, same contract
    assert big.dtype == torch.float32 and torch.equal(big, big.half().float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,bias", [(1, 40, 1100, True), (3, 21, 300, False), (4, 64, 96, True)])
@pytest.mark.parametrize("block_n", [4, 16])
def test_gemv_matches_torch(dtype, M, N, K, bias, block_n):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = decode_linear.linear(x, w, b, way=("gemv", block_n))
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = dict(atol=2e-2, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y.float(), ref, **tol)
    assert y.dtype == dtype and y.shape == (M, N)


@pytest.mark.parametrize("M,N,K,split", [(1, 40, 1100, 2), (3, 21, 1300, 3), (4, 20, 2048, 4)])
def test_split_k_gemv_matches_torch_and_leaves_its_counters_at_rest(M, N, K, split):
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g)
    w = 0.1 * torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    y = decode_linear.linear(x, w, b, way=("gemv_split", split))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
    n_blocks = -(-N // decode_linear.SPLIT_BLOCK_N)
    locks = decode_linear._locks[(x.device.index, n_blocks)]
    assert locks.shape == (n_blocks,) and not locks.any()  # each row block's last arrival reset its counter
    # the parts are added in split order whichever program arrives last: the same bits every call
    assert torch.equal(decode_linear.linear(x, w, b, way=("gemv_split", split)), y)
    assert torch.equal(decode_linear.linear(x.flip(0), w, b, way=("gemv_split", split)).flip(0), y)


def test_split_k_is_offered_for_tall_matrices_only_and_refuses_fused_forms():
    tall = decode_linear.linear_candidates(1, 896, 4864, 132)
    assert [w for w in tall if w[0] == "gemv_split"] == [("gemv_split", 5), ("gemv_split", 10)]
    assert not [w for w in decode_linear.linear_candidates(1, 9728, 896, 132) if w[0] == "gemv_split"]
    assert not [w for w in decode_linear.linear_candidates(8, 896, 4864, 132) if w[0] == "gemv_split"]
    with pytest.raises(ValueError, match="plain projections"):
        decode_linear._gemv(torch.zeros(1, 1024), torch.zeros(8, 1024), None, torch.float32, 8,
                            norm_weight=torch.ones(1024), split=2)


def test_gemv_refuses_more_rows_than_it_serves():
    with pytest.raises(ValueError, match="up to 4 rows"):
        decode_linear._gemv(torch.zeros(5, 8), torch.zeros(3, 8), None, torch.float32)
    assert ("gemv", 4) not in decode_linear.linear_candidates(5) and ("gemv", 4) in decode_linear.linear_candidates(4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,with_residual,swiglu,bias", [(1, True, False, False), (2, False, True, True),
                                                         (3, True, True, False), (4, True, False, True)])
def test_norm_linear_fused_equals_norm_then_linear(dtype, M, with_residual, swiglu, bias):
    g = torch.Generator().manual_seed(10 * M + swiglu)
    N, K = 24, 700  # several programs along N, K over two K tiles
    x = torch.randn(M, K, generator=g).to(dtype)
    res = torch.randn(M, K, generator=g).to(dtype) if with_residual else None
    nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    w = (0.05 * torch.randn(2 * N if swiglu else N, K, generator=g)).to(dtype)
    b = torch.randn(w.shape[0], generator=g).to(dtype) if bias else None
    h, ref_res = rms_norm_torch(x, nw, 1e-5, res)
    ref = torch.nn.functional.linear(h.float(), w.float(), None if b is None else b.float())
    if swiglu:
        ref = silu_mul_torch(ref.to(dtype)).float()
    tol = dict(atol=3e-2, rtol=3e-3) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-5)
    for block_n in (4, 16):
        y, new_res = decode_linear.norm_linear(x, nw, 1e-5, w, b, res, swiglu=swiglu, way=("fused", block_n))
        assert y.shape == (M, N) and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, **tol)
        if with_residual:
            assert torch.equal(new_res, ref_res)  # written once, by one program, exactly
        else:
            assert new_res is None
    y2, res2 = decode_linear.norm_linear(x, nw, 1e-5, w, b, res, swiglu=swiglu, way=("separate", 0))
    torch.testing.assert_close(y2.float(), ref, **tol)


def test_norm_linear_above_four_rows_runs_the_separate_kernels():
    g = torch.Generator().manual_seed(5)
    x, res = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    nw, w = torch.ones(64), torch.randn(40, 64, generator=g) / 8
    y, new_res = decode_linear.norm_linear(x, nw, 1e-6, w, None, res, swiglu=True)
    h, ref_res = rms_norm_torch(x, nw, 1e-6, res)
    torch.testing.assert_close(y, silu_mul_torch(torch.nn.functional.linear(h, w)), atol=1e-5, rtol=1e-5)
    assert torch.equal(new_res, ref_res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,heads,kv_heads,D,with_residual,bias",
                         [(1, 4, 2, 16, True, True), (3, 6, 2, 32, False, False), (4, 3, 3, 16, True, False)])
def test_norm_qkv_rope_fused_equals_the_separate_ops(dtype, M, heads, kv_heads, D, with_residual, bias):
    g = torch.Generator().manual_seed(M * heads + D)
    K, page, blocks = 200, 4, 5
    N = (heads + 2 * kv_heads) * D
    x = torch.randn(M, K, generator=g).to(dtype)
    res = torch.randn(M, K, generator=g).to(dtype) if with_residual else None
    nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    pos = torch.tensor([5, 900, 17, 3000][:M])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_cos_sin_torch(pos, inv_freq, 1.0, dtype)
    slots = torch.tensor([7, -1, 0, 19][:M])  # the second token has no slot: nothing stored
    caches = [torch.full((blocks, page, kv_heads, D), 9.0, dtype=dtype) for _ in range(4)]
    args = (x, nw, 1e-5, w, b, res, cos, sin, heads, kv_heads)
    q_ref, res_ref = decode_linear.norm_qkv_rope(*args, caches[0], caches[1], slots, way=("separate", 0))
    tol = dict(atol=3e-2, rtol=3e-3) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-5)
    for pairs in (2, 8):
        kc, vc = caches[2].clone(), caches[3].clone()
        q, new_res = decode_linear.norm_qkv_rope(*args, kc, vc, slots, way=("fused", pairs))
        assert q.shape == (M, heads, D) and q.dtype == dtype
        torch.testing.assert_close(q, q_ref, **tol)
        torch.testing.assert_close(kc, caches[0], **tol)
        torch.testing.assert_close(vc, caches[1], **tol)
        assert (kc.view(-1, kv_heads, D)[[1, 2, 3, 4]] == 9.0).all()  # slots not written keep their contents
        if with_residual:
            torch.testing.assert_close(new_res, res_ref, atol=0, rtol=0)
        else:
            assert new_res is None
    # Qwen3's q/k norm takes the separate ops, whatever was asked
    qk = (torch.ones(D, dtype=dtype), torch.ones(D, dtype=dtype), 1e-6)
    q_n, _ = decode_linear.norm_qkv_rope(*args, caches[2], caches[3], slots, qk_norm=qk)
    q_s, _ = decode_linear.norm_qkv_rope(*args, caches[0], caches[1], slots, qk_norm=qk, way=("separate", 0))
    torch.testing.assert_close(q_n, q_s, atol=0, rtol=0)
