"""Fused per-token ops of the decoder layer: fewer, larger kernels for launch-bound decoding.

A decode step of a small model is bound by kernel launches, not bytes: an eager layer issues about
forty kernels (RMSNorm alone is seven). These three, and the projections of
`decode_linear.py` (which also fold the norms and SiLU into the projections for decode steps),
bring a layer to seven to ten launches:

* `rms_norm(x, weight, eps, residual)`: optional residual add, then RMSNorm, one kernel.
* `rope_store_kv(qkv, cos, sin, ...)`: optional per-head q/k RMSNorm (Qwen3), RoPE on q and k,
  and the K/V store into the paged cache, one kernel; returns q rotated in place in `qkv`.
* `silu_mul(gate_up)`: SiLU(gate) * up, one kernel.
* `rope_cos_sin(positions, inv_freq, scale, dtype)`: the step's RoPE tables, one kernel where
  torch takes nine (a decode step pays them once, not per layer, but they are nine launches).

Each op rounds where the Hugging Face modules round (their bf16/fp16 intermediates), so the
Triton and torch paths agree to the last bit up to the order of float32 sums. On CPU tensors the
torch path runs unless TRITON_INTERPRET=1 (tests run the kernels in Triton's interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels.attention import triton_interpret
from slipstream.kernels.pdl import pdl_kwargs
from slipstream.kernels.reference import store_kv

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from slipstream.kernels.pdl import pdl_prologue
except ImportError:  # CPU-only installs run the torch path
    triton = None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve `x`: CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and triton_interpret())


# ----------------------------------------------------------------------------------------------
# torch paths (the CPU engine, and the references of the tests)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm(x + residual), x + residual); without `residual`: (RMSNorm(x), None)."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def rope_store_kv_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                        eps: float = 1e-6) -> torch.Tensor:
    T, D = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q, k, v = q.view(T, num_heads, D), k.view(T, num_kv_heads, D), v.view(T, num_kv_heads, D)
    if q_norm is not None:
        q, _ = rms_norm_torch(q, q_norm, eps)
        k, _ = rms_norm_torch(k, k_norm, eps)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def rope_cos_sin_torch(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[..., None].float() * inv_freq  # positions of any shape
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, N, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        dtype = x.dtype
        x = x.to(tl.float32)
        if HAS_RES:
            x = (x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x * rstd).to(dtype).to(tl.float32) * w
        tl.store(out_ptr + row * stride_o + cols, y.to(dtype), mask=mask)

    @triton.jit
    def _norm_rotate(x1, x2, c, s, w_ptr, eps, mask, HALF: tl.constexpr, NORM: tl.constexpr):
        """[heads, HALF] halves of a head vector: optional per-head RMSNorm, then RoPE, rounded like torch."""
        dtype = x1.dtype
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        if NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
            cols = tl.arange(0, HALF)
            w1 = tl.load(w_ptr + cols).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + cols).to(tl.float32)
            x1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
            x2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the activation dtype as torch does
        o1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
        o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
        return o1.to(dtype), o2.to(dtype)

    @triton.jit
    def _rope_store_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, qn_ptr, kn_ptr,
                           stride_t, stride_cos, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h, eps,
                           H: tl.constexpr, KVH: tl.constexpr, H_P2: tl.constexpr, KVH_P2: tl.constexpr,
                           HALF: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        t = tl.program_id(0).to(tl.int64)
        D: tl.constexpr = 2 * HALF
        cols = tl.arange(0, HALF)
        c = tl.load(cos_ptr + t * stride_cos + cols).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_cos + cols).to(tl.float32)[None, :]
        base = qkv_ptr + t * stride_t
        # q, rotated in place
        hq = tl.arange(0, H_P2)
        mq = (hq < H)[:, None]
        p = base + hq[:, None] * D + cols[None, :]
        o1, o2 = _norm_rotate(tl.load(p, mask=mq, other=0.0), tl.load(p + HALF, mask=mq, other=0.0), c, s,
                              qn_ptr, eps, mq, HALF, NORM)
        tl.store(p, o1, mask=mq)
        tl.store(p + HALF, o2, mask=mq)
        # k rotated, k and v stored to the cache slot (slot < 0: not stored)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            hk = tl.arange(0, KVH_P2)
            mk = (hk < KVH)[:, None]
            pk = base + H * D + hk[:, None] * D + cols[None, :]
            k1, k2 = _norm_rotate(tl.load(pk, mask=mk, other=0.0), tl.load(pk + HALF, mask=mk, other=0.0), c, s,
                                  kn_ptr, eps, mk, HALF, NORM)
            kc = kc_ptr + slot * stride_kc_slot + hk[:, None] * stride_kc_h + cols[None, :]
            tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=mk)
            tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mk)
            pv = base + (H + KVH) * D + hk[:, None] * D + cols[None, :]
            vc = vc_ptr + slot * stride_vc_slot + hk[:, None] * stride_vc_h + cols[None, :]
            tl.store(vc, tl.load(pv, mask=mk, other=0.0).to(vc_ptr.dtype.element_ty), mask=mk)
            tl.store(vc + HALF, tl.load(pv + HALF, mask=mk, other=0.0).to(vc_ptr.dtype.element_ty), mask=mk)

    @triton.jit
    def _rope_cos_sin_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, T, scale, HALF: tl.constexpr,
                             BLOCK_T: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, HALF)
        mask = (rows < T)[:, None]
        pos = tl.load(pos_ptr + rows, mask=rows < T, other=0).to(tl.float32)
        freqs = pos[:, None] * tl.load(inv_ptr + cols)[None, :]
        if LIBDEVICE:  # CUDA's cosf/sinf, as torch's kernels: full range reduction (positions reach
            # tens of thousands of radians), where an approximate instruction would drift
            c, s = libdevice.cos(freqs), libdevice.sin(freqs)
        else:  # the interpreter (numpy)
            c, s = tl.cos(freqs), tl.sin(freqs)
        c = (c * scale).to(cos_ptr.dtype.element_ty)
        s = (s * scale).to(sin_ptr.dtype.element_ty)
        offs = rows[:, None].to(tl.int64) * (2 * HALF) + cols[None, :]
        tl.store(cos_ptr + offs, c, mask=mask)
        tl.store(cos_ptr + offs + HALF, c, mask=mask)
        tl.store(sin_ptr + offs, s, mask=mask)
        tl.store(sin_ptr + offs + HALF, s, mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# The ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm(x + residual), x + residual) over the last dim of [T, N]; without `residual`, (RMSNorm(x), None)."""
    if not use_triton(x) or x.dim() != 2:
        return rms_norm_torch(x, weight, eps, residual)
    T, N = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    if T:
        _rms_norm_kernel[(T,)](x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0),
                               res_out.stride(0), N, float(eps), HAS_RES=residual is not None,
                               BLOCK=triton.next_power_of_2(N), num_warps=4 if N <= 2048 else 8, **pdl_kwargs(x))
    return out, (res_out if residual is not None else None)


def rope_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                  eps: float = 1e-6) -> torch.Tensor:
    """q [T, heads, D] after (q/k norm and) RoPE; k (normed, rotated) and v stored at `slot_mapping` (< 0: skipped).

    qkv [T, (heads + 2 kv_heads) * D] is the fused projection's output, cos/sin [T, D] in its dtype.
    On the Triton path q is rotated in place (the returned tensor is a view of `qkv`).
    """
    T, D = qkv.shape[0], k_cache.shape[-1]
    if not use_triton(qkv) or qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 \
            or D % 2 or (D // 2) & (D // 2 - 1):
        return rope_store_kv_torch(qkv, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping,
                                   q_norm, k_norm, eps)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    cos, sin = cos.contiguous(), sin.contiguous()
    norm = q_norm is not None
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    if T:
        _rope_store_kernel[(T,)](
            qkv, cos, sin, slot_mapping, kc, vc, q_norm if norm else cos, k_norm if norm else cos,
            qkv.stride(0), cos.stride(0), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), float(eps),
            H=num_heads, KVH=num_kv_heads, H_P2=triton.next_power_of_2(num_heads),
            KVH_P2=triton.next_power_of_2(num_kv_heads), HALF=D // 2, NORM=norm, num_warps=4, **pdl_kwargs(qkv))
    return qkv[:, : num_heads * D].view(T, num_heads, D)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, 2 * len(inv_freq)] in `dtype` of positions [T] at float32 frequencies `inv_freq`,
    times `scale`: computed in float32 and rounded once, as the Hugging Face rotary embedding does."""
    half = inv_freq.shape[0]
    if not use_triton(positions) or positions.dim() != 1 or inv_freq.dtype != torch.float32 or half & (half - 1):
        return rope_cos_sin_torch(positions, inv_freq, scale, dtype)
    T = positions.shape[0]
    cos = torch.empty(T, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    if T:
        block_t = min(64, triton.next_power_of_2(T))
        _rope_cos_sin_kernel[(triton.cdiv(T, block_t),)](positions.contiguous(), inv_freq.contiguous(), cos, sin, T,
                                                        float(scale), HALF=half, BLOCK_T=block_t,
                                                        LIBDEVICE=positions.device.type == "cuda", num_warps=4,
                                                        **pdl_kwargs(positions))
    return cos, sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of [T, 2I] (gate first) -> [T, I]."""
    if not use_triton(gate_up) or gate_up.dim() != 2 or gate_up.stride(-1) != 1:
        return silu_mul_torch(gate_up)
    T, N2 = gate_up.shape
    N = N2 // 2
    out = torch.empty(T, N, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = min(1024, triton.next_power_of_2(N))
        _silu_mul_kernel[(T, triton.cdiv(N, block))](gate_up, out, gate_up.stride(0), out.stride(0), N, BLOCK=block,
                                                     num_warps=4, **pdl_kwargs(gate_up))
    return out
