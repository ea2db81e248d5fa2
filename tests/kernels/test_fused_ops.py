"""The fused layer ops (Triton, run in the interpreter) against their torch paths."""

import pytest
import torch

from slipstream.kernels import fused_ops
from slipstream.kernels.fused_ops import (rms_norm, rms_norm_torch, rope_cos_sin, rope_cos_sin_torch, rope_store_kv,
                                          rope_store_kv_torch, silu_mul, silu_mul_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(dtype)
    res = torch.randn(5, 96, generator=g).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    out, new_res = rms_norm(x, w, 1e-5, res)
    ref, ref_res = rms_norm_torch(x, w, 1e-5, res)
    torch.testing.assert_close(out, ref, atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=1e-3)
    if with_residual:
        torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)  # one rounding of one add: exact
    else:
        assert new_res is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,qk_norm", [(9, 3, False), (4, 4, True), (6, 2, True)])
def test_rope_store_kv_matches_torch(dtype, heads, kv_heads, qk_norm):
    g = torch.Generator().manual_seed(1)
    T, D, page, blocks = 7, 16, 4, 6
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 2, 9, 30, 31, 4000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.tensor([3, 0, 17, -1, 8, 23, 12])  # one token without a slot: not stored
    qn = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype) if qk_norm else None
    caches = [torch.full((blocks, page, kv_heads, D), 7.0, dtype=dtype) for _ in range(4)]

    q_ref = rope_store_kv_torch(qkv.clone(), cos, sin, heads, kv_heads, caches[0], caches[1], slots, qn, kn, 1e-6)
    q = rope_store_kv(qkv.clone(), cos, sin, heads, kv_heads, caches[2], caches[3], slots, qn, kn, 1e-6)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(caches[2], caches[0], **tol)
    torch.testing.assert_close(caches[3], caches[1], atol=0, rtol=0)  # v is copied as is
    flat = caches[2].view(-1, kv_heads, D)
    untouched = torch.ones(blocks * page, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (flat[untouched] == 7.0).all()  # nothing written outside the slots


def test_rope_store_kv_rotates_q_in_place_on_the_triton_path():
    D, heads, kv = 8, 2, 1
    qkv = torch.randn(3, (heads + 2 * kv) * D)
    cos, sin = torch.randn(3, D), torch.randn(3, D)
    cache = torch.zeros(2, 4, kv, D), torch.zeros(2, 4, kv, D)
    q = rope_store_kv(qkv, cos, sin, heads, kv, *cache, torch.tensor([0, 1, 2]))
    assert q.data_ptr() == qkv.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # (the interpreter's bf16 casts truncate)
@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_rope_cos_sin_matches_torch(dtype, scale):
    # positions far past 2 pi (full range reduction) and more rows than one program takes
    pos = torch.cat([torch.arange(70), torch.tensor([4095, 32767, 131071])])
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 64, 2).float() / 64))
    cos, sin = rope_cos_sin(pos, inv_freq, scale, dtype)
    ref_cos, ref_sin = rope_cos_sin_torch(pos, inv_freq, scale, dtype)
    assert cos.shape == sin.shape == (73, 64) and cos.dtype == dtype
    tol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(cos, ref_cos, **tol)
    torch.testing.assert_close(sin, ref_sin, **tol)
    assert rope_cos_sin(pos[:0], inv_freq, scale, dtype)[0].shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_matches_torch(dtype):
    x = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(silu_mul(x), silu_mul_torch(x), atol=1e-3 if dtype == torch.float16 else 1e-6,
                               rtol=1e-3)


def test_torch_path_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_ops.use_triton(torch.zeros(1))
