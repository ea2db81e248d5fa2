"""The projections of decode steps: a few rows times each weight matrix, whose read is the cost.

Which kernel streams a given matrix fastest depends on its shape and the card. On an H200 at one
row, with the weights read from HBM as in a decode step (benchmarks/linear_variants.py): a GEMV
Triton kernel for up to 4 rows (multiply-add along K, no padding to a 16-row tile) beats cuBLAS
on the qkv, o and gate_up projections; on the tall down projections, whose row blocks alone keep
too few loads in flight, a split-K GEMV does (0.5B: 5.6 vs 8.1 us); a tiled kernel (tl.dot on
16-row tiles) serves 5-16 rows of small matrices. So each (rows, shape) is timed once, every way,
on its first call outside a graph capture (a graph's warm-up run decides), in a CUDA graph that
cycles through copies of the weight larger than L2 together, and the fastest serves it from then on.

At one row, a kernel launch costs about what reading a small matrix does, so the GEMV kernel can
also run the op before and after a projection: `norm_linear` computes RMSNorm(x + residual) in
its prologue (each program recomputes the row norm from L2: a few KB) and, for gate_up, SiLU(gate)
* up in its epilogue, taking a layer from ten launches to seven; `norm_qkv_rope` also applies
RoPE and stores K/V in the q/k/v projection's epilogue (six). These fused forms are timed
against the separate kernels like the rest. (On 16-row tiles the same prologue measured slower
than the separate launch.) Every form rounds where the torch path (`rms_norm_torch`, F.linear,
`silu_mul_torch`) rounds, so they agree up to the order of float32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels.fused_ops import rms_norm, rope_store_kv, silu_mul, use_triton
from slipstream.kernels.paged_attention import sm_count
from slipstream.kernels.pdl import pdl_kwargs

try:
    import triton
    import triton.language as tl

    from slipstream.kernels.fused_ops import _norm_rotate
    from slipstream.kernels.pdl import pdl_prologue
except ImportError:  # CPU-only installs run the torch path
    triton = None

SMALL_M = 16  # rows up to which the Triton kernels compete
GEMV_MAX_M = 4  # rows up to which the GEMV kernel competes
_choice: dict[tuple, tuple[str, int]] = {}  # what a call's key measured fastest: (way, BLOCK_N)

if triton is not None:

    @triton.jit
    def _tiled_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                      PDL: tl.constexpr):
        pdl_prologue(PDL)
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, 16)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), tl.float32)
        n_mask = rn < N
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & k_mask[None, :],
                        other=0.0)
            w = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + kk[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_N] = W^T tile
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        # rounded to the weights' dtype first, as F.linear's output is, whatever y's dtype
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(w_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & n_mask[None, :])

    @triton.jit
    def _gemv_main(x_ptr, r_ptr, nw_ptr, ro_ptr, w_ptr, rn, n_mask, pair_rows, K, k_lo, k_hi, stride_xm, stride_rm,
                   stride_rom, stride_wn, eps, M, write_res, M_P2: tl.constexpr, NORM: tl.constexpr,
                   HAS_RES: tl.constexpr, PAIR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(acc, acc_pair) [BLOCK_N, M_P2] float32: sum_k h[m, k] * w[n, k] over the weight rows
        n = rn (and n = rn + pair_rows when PAIR) for up to 4 rows m, streamed along k_lo <= k < k_hi.

        NORM (whole K only): h = RMSNorm(x + residual) * nw (x + residual written to ro where
        write_res), else h = x.
        """
        rk = tl.arange(0, BLOCK_K)
        cols = tl.arange(0, M_P2)
        if NORM:  # the rows' norms, from x + residual rounded as the torch path rounds it
            ss = tl.zeros((M_P2,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                for m in tl.static_range(M_P2):  # rows past M load zeros
                    x_mask = kk < tl.where(m < M, K, 0)
                    v = tl.load(x_ptr + m * stride_xm + kk, mask=x_mask, other=0.0)
                    if HAS_RES:
                        v = (v.to(tl.float32) + tl.load(r_ptr + m * stride_rm + kk, mask=x_mask,
                                                        other=0.0).to(tl.float32)).to(v.dtype)
                    v = v.to(tl.float32)
                    ss += tl.where(cols == m, tl.sum(v * v, 0), 0.0)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = tl.zeros((BLOCK_N, M_P2), tl.float32)
        acc_pair = tl.zeros((BLOCK_N, M_P2), tl.float32)
        k_store = tl.where(write_res, K, 0)  # one program writes the new residual stream
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < k_hi
            wp = w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :]
            wm = n_mask[:, None] & k_mask[None, :]
            w = tl.load(wp, mask=wm, other=0.0).to(tl.float32)
            if PAIR:
                w_pair = tl.load(wp + pair_rows * stride_wn, mask=wm, other=0.0).to(tl.float32)
            if NORM:
                nw = tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            for m in tl.static_range(M_P2):
                k_row = tl.where(m < M, k_hi, 0)  # rows past M load zeros and store nothing
                x = tl.load(x_ptr + m * stride_xm + kk, mask=kk < k_row, other=0.0)
                if NORM:
                    if HAS_RES:
                        x = (x.to(tl.float32) + tl.load(r_ptr + m * stride_rm + kk, mask=kk < k_row,
                                                        other=0.0).to(tl.float32)).to(x.dtype)
                        tl.store(ro_ptr + m * stride_rom + kk, x, mask=kk < tl.minimum(k_store, k_row))
                    r_m = tl.sum(tl.where(cols == m, rstd, 0.0), 0)
                    x = ((x.to(tl.float32) * r_m).to(x.dtype).to(tl.float32) * nw).to(x.dtype)
                x = x.to(tl.float32)
                acc += tl.where(cols[None, :] == m, tl.sum(w * x[None, :], 1)[:, None], 0.0)
                if PAIR:
                    acc_pair += tl.where(cols[None, :] == m, tl.sum(w_pair * x[None, :], 1)[:, None], 0.0)
        return acc, acc_pair

    @triton.jit
    def _gemv_kernel(x_ptr, r_ptr, nw_ptr, ro_ptr, w_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, N, K, K_PER, stride_xm,
                     stride_rm, stride_rom, stride_wn, stride_ym, eps, M, M_P2: tl.constexpr, NORM: tl.constexpr,
                     HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
        """y[m, n] = sum_k h[m, k] * w[n, k] for up to 4 rows m, BLOCK_N rows of W per program.

        SWIGLU: W holds 2N rows (gate, then up); y = SiLU(gate) * up of the two products.
        SPLIT > 1 (plain projections): program (i, s) sums the K range [s * K_PER, (s + 1) * K_PER)
        into float32 scratch; the last of a row block's programs to arrive adds the parts in split
        order (the same sums whoever arrives last), writes y and sets the block's counter back to 0.
        """
        pdl_prologue(PDL)
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, M_P2)
        n_mask = rn < N
        k_lo = tl.program_id(1) * K_PER
        k_hi = tl.minimum(k_lo + K_PER, K)
        acc, acc_up = _gemv_main(x_ptr, r_ptr, nw_ptr, ro_ptr, w_ptr, rn, n_mask, N, K, k_lo, k_hi, stride_xm,
                                 stride_rm, stride_rom, stride_wn, eps, M, pid == 0, M_P2, NORM, HAS_RES, SWIGLU,
                                 BLOCK_N, BLOCK_K)
        rows = M
        if SPLIT > 1:
            parts = part_ptr + rn[:, None] * M_P2 + cols[None, :]  # [SPLIT, N, M_P2]
            tl.store(parts + tl.program_id(1) * N * M_P2, acc, mask=n_mask[:, None])
            tl.debug_barrier()  # every thread's part is stored before the release below
            arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
            last = arrived == SPLIT - 1
            if last:
                acc = tl.zeros((BLOCK_N, M_P2), tl.float32)
                for sp in tl.static_range(SPLIT):
                    acc += tl.load(parts + sp * N * M_P2, mask=n_mask[:, None], other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(lock_ptr + pid, 0)  # at rest for the next launch (graph replays)
            rows = tl.where(last, M, 0)  # only the last arrival writes y
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if SWIGLU:
                acc_up += tl.load(b_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        dtype = w_ptr.dtype.element_ty
        out = acc.to(dtype)  # the projection's output, rounded as F.linear's
        if SWIGLU:
            g = out.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            out = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(y_ptr + cols[None, :] * stride_ym + rn[:, None], out.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (cols[None, :] < rows))

    @triton.jit
    def _qkv_rope_kernel(x_ptr, r_ptr, nw_ptr, ro_ptr, w_ptr, b_ptr, q_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                         K, stride_xm, stride_rm, stride_rom, stride_wn, stride_qm, stride_cos, stride_kc_slot,
                         stride_kc_h, stride_vc_slot, stride_vc_h, eps, M, M_P2: tl.constexpr, NORM: tl.constexpr,
                         HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr,
                         HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """The fused q/k/v projection with RoPE and the K/V store in its epilogue.

        A program takes BLOCK_N dimensions j of one head's first half and the same ones of its
        second half (j + HALF), the pairs RoPE rotates together; q heads are written rotated to
        q, k heads rotated and v heads as they are to the cache slots (slot < 0: not stored).
        """
        pdl_prologue(PDL)
        pid = tl.program_id(0)
        head = pid // (HALF // BLOCK_N)
        j = (pid % (HALF // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = head * (2 * HALF) + j
        cols = tl.arange(0, M_P2)
        m_mask = (cols < M)[None, :]
        acc1, acc2 = _gemv_main(x_ptr, r_ptr, nw_ptr, ro_ptr, w_ptr, rn, j < HALF, HALF, K, 0, K, stride_xm,
                                stride_rm, stride_rom, stride_wn, eps, M, pid == 0, M_P2, NORM, HAS_RES, True, BLOCK_N,
                                BLOCK_K)
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn).to(tl.float32)[:, None]
            acc2 += tl.load(b_ptr + rn + HALF).to(tl.float32)[:, None]
        dtype = w_ptr.dtype.element_ty
        x1, x2 = acc1.to(dtype), acc2.to(dtype)  # the projection's output, rounded as F.linear's
        if head < H + KVH:  # q and k heads: RoPE, rounded as the torch path rounds it
            c = tl.load(cos_ptr + cols[None, :] * stride_cos + j[:, None], mask=m_mask, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + cols[None, :] * stride_cos + j[:, None], mask=m_mask, other=0.0).to(tl.float32)
            x1, x2 = _norm_rotate(x1, x2, c, s, w_ptr, eps, m_mask, HALF, False)
        if head < H:
            dst = q_ptr + cols[None, :] * stride_qm + head * (2 * HALF) + j[:, None]
            mask = m_mask
        else:
            slot = tl.load(slot_ptr + cols, mask=cols < M, other=-1)
            mask = m_mask & (slot >= 0)[None, :]
            if head < H + KVH:
                dst = kc_ptr + slot[None, :] * stride_kc_slot + (head - H) * stride_kc_h + j[:, None]
            else:
                dst = vc_ptr + slot[None, :] * stride_vc_slot + (head - H - KVH) * stride_vc_h + j[:, None]
        tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, x2.to(dst.dtype.element_ty), mask=mask)


def _tiled(x, weight, bias, out_dtype, block_n=0) -> torch.Tensor:
    M, (N, K) = x.shape[0], weight.shape
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    block_n = 32 if N >= 4096 else 16
    _tiled_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=256 if x.element_size() == 2 else 64,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3, **pdl_kwargs(x))
    return y


_locks: dict[tuple, torch.Tensor] = {}  # (device index, row blocks) -> arrival counters, zero at rest


def _split_locks(device: torch.device, n_blocks: int) -> torch.Tensor:
    key = (device.index, n_blocks)
    if key not in _locks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a split-K projection must run once outside a CUDA graph capture first")
        _locks[key] = torch.zeros(n_blocks, dtype=torch.int32, device=device)
    return _locks[key]


def _gemv(x, weight, bias, out_dtype, block_n: int = 8, norm_weight=None, eps: float = 0.0, residual=None,
          swiglu: bool = False, split: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, x + residual or None): the GEMV kernel, optionally with its norm prologue / SwiGLU
    epilogue, or (plain projections) with K split over `split` programs per row block."""
    M, (N, K) = x.shape[0], weight.shape
    if M > GEMV_MAX_M:
        raise ValueError(f"the GEMV kernel takes up to {GEMV_MAX_M} rows, got {M}")
    if split > 1 and (swiglu or norm_weight is not None):
        raise ValueError("split-K serves plain projections only (no norm prologue, no SwiGLU epilogue)")
    if swiglu:
        N //= 2
    block_k = 512
    k_per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per)
    n_blocks = triton.cdiv(N, block_n)
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    r = residual if residual is not None else x
    ro = res_out if res_out is not None else x
    m_p2 = triton.next_power_of_2(M)
    if split > 1:
        part, lock = torch.empty(split, N, m_p2, dtype=torch.float32, device=x.device), _split_locks(x.device, n_blocks)
    else:
        part = lock = y  # unused
    _gemv_kernel[(n_blocks, split)](
        x, r, norm_weight if norm_weight is not None else weight, ro, weight, bias if bias is not None else weight, y,
        part, lock, N, K, k_per, x.stride(0), r.stride(0), ro.stride(0), weight.stride(0), y.stride(0), float(eps),
        M=M, M_P2=m_p2, NORM=norm_weight is not None, HAS_RES=residual is not None,
        SWIGLU=swiglu, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, num_warps=4,
        num_stages=3, **pdl_kwargs(x))
    return y, res_out


def _torch(x, weight, bias, out_dtype, block_n=0) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


SPLIT_BLOCK_N = 8  # rows of W per program of the split-K GEMV
_WAYS = {"cublas": _torch, "tiled": _tiled, "gemv": lambda *a: _gemv(*a)[0],
         "gemv_split": lambda x, w, b, od, split: _gemv(x, w, b, od, SPLIT_BLOCK_N, split=split)[0]}


def linear_candidates(M: int, N: int = 1, K: int = 1, num_sms: int = 132) -> list[tuple[str, int]]:
    """The (way, BLOCK_N or K splits) a projection of M rows of an [N, K] weight is timed with:
    split-K GEMVs too where K > N, whose row blocks alone keep few programs in flight."""
    ways = [("cublas", 0), ("tiled", 0)]
    if M > GEMV_MAX_M:
        return ways
    ways += [("gemv", 4), ("gemv", 16)]
    if K > N:
        base = triton.cdiv(4 * num_sms, triton.cdiv(N, SPLIT_BLOCK_N))  # about four programs per SM
        ways += [("gemv_split", s) for s in sorted({base, 2 * base}) if 1 < s and K // s >= 256]
    return ways


def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def _cold_weights(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` and as many copies as make 2x the L2 cache: calls that cycle through them read the
    weights from HBM, as a decode step does (its layers together are far larger than L2). Timed on
    one matrix left in L2, the kernels that win are not the ones that stream it fastest from HBM."""
    n = max(1, -(-2 * _l2_bytes(weight.device) // (weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(n - 1)]


def _time_us(fn, weights: list[torch.Tensor], flush: torch.Tensor, reps: int = 20) -> float:
    """GPU microseconds per call of `fn(weight)`: `reps` calls cycling through `weights`
    (`_cold_weights`) in one CUDA graph, as the decode step runs them (no host launch cost, the
    kernels' PDL overlap), best of three replays each started with nothing of the weights in L2
    (`flush`, a buffer of 2x L2, is overwritten first)."""
    for w in weights[:3]:  # compiles, and allocates what the calls keep (split-K counters)
        fn(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(weights[i % len(weights)])
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    return best


def _fastest(key: tuple, runs: dict, default, weight: torch.Tensor) -> tuple[str, int]:
    """The way in `runs` (way -> call taking the weight) that measured fastest for `key`, timed on
    first use with the weights read from HBM."""
    if key not in _choice:
        if torch.cuda.is_current_stream_capturing():
            return default  # cannot time inside a capture; graphs run an eager warm-up first, which decides
        weights = _cold_weights(weight)
        flush = torch.empty(2 * _l2_bytes(weight.device), dtype=torch.uint8, device=weight.device)
        times = {way: _time_us(fn, weights, flush) for way, fn in runs.items()}
        _choice[key] = min(times, key=times.get)
    return _choice[key]


def timings_so_far() -> int:
    """Projection shapes timed in this process (each timing stalls the step that meets the shape)."""
    return len(_choice)


def _m_bucket(M: int) -> int:
    """Rows are timed per power-of-two bucket (1, 2, 4, 8, 16): one timing serves every M in it,
    as the GEMV kernel compiles once per bucket."""
    return triton.next_power_of_2(M)


def _serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (use_triton(x) and x.dim() == 2 and 0 < x.shape[0] <= SMALL_M and x.stride(-1) == 1
            and weight.stride(-1) == 1 and x.dtype == weight.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, way: tuple[str, int] | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias), optionally cast to `out_dtype` (rounded to the weights'
    dtype first, as F.linear(...).to(out_dtype) is). Up to 16 rows on GPU, the fastest of
    `linear_candidates` for the shape serves it (`way` forces one); F.linear serves the rest."""
    if not _serves(x, weight):
        return _torch(x, weight, bias, out_dtype)
    out_dtype = out_dtype or x.dtype
    M = x.shape[0]
    if way is None:
        if x.device.type != "cuda":  # the interpreter: the tests run the kernels
            way = ("gemv", 8) if M <= GEMV_MAX_M else ("tiled", 0)
        else:
            key = ("linear", _m_bucket(M), *weight.shape, x.dtype, bias is not None, out_dtype, x.device.index)
            way = _fastest(key, {w: (lambda wt, w=w: _WAYS[w[0]](x, wt, bias, out_dtype, w[1]))
                                 for w in linear_candidates(M, *weight.shape, sm_count(x.device))}, ("tiled", 0), weight)
    return _WAYS[way[0]](x, weight, bias, out_dtype, way[1])


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, swiglu: bool = False,
                way: tuple[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(linear(RMSNorm(x + residual)), x + residual); without `residual` the second is None.

    `swiglu`: `weight` is a fused gate/up projection [2I, K] and the first result is
    SiLU(gate) * up [M, I]. Up to 4 rows on GPU, one GEMV kernel with the norm in its prologue
    (and SwiGLU in its epilogue) where that measured faster than the separate kernels; `way`
    ("fused", BLOCK_N) or ("separate", 0) forces one.
    """
    M = x.shape[0]
    fusable = _serves(x, weight) and M <= GEMV_MAX_M and (residual is None or residual.stride(-1) == 1)

    def separate(w=weight):
        h, res = rms_norm(x, norm_weight, eps, residual)
        y = linear(h, w, bias)
        return (silu_mul(y) if swiglu else y), res

    def fused(block_n, w=weight):
        return _gemv(x, w, bias, x.dtype, block_n, norm_weight, eps, residual, swiglu)

    def key():
        return ("norm_linear", _m_bucket(M), *weight.shape, x.dtype, bias is not None, residual is not None, swiglu,
                x.device.index)

    return _fused_or_separate(x, weight, fusable, key, fused, separate, (4, 16), 8, way)


def _fused_or_separate(x: torch.Tensor, weight: torch.Tensor, fusable: bool, key, fused, separate,
                       blocks: tuple[int, int], interpreter_block: int, way: tuple[str, int] | None):
    """separate(), or fused(block) for the block in `blocks` that measured fastest for the shape
    (`key()`, asked only on GPU) if that beat separate(); the interpreter takes `interpreter_block`;
    `way` forces one. Both take the projection's weight as an optional last argument (`weight` by
    default), which the timing varies."""
    if not fusable:
        return separate()
    if way is None:
        if x.device.type != "cuda":
            way = ("fused", interpreter_block)
        else:
            runs = {("fused", b): (lambda w, b=b: fused(b, w)) for b in blocks}
            way = _fastest(key(), {**runs, ("separate", 0): separate}, ("separate", 0), weight)
    return fused(way[1]) if way[0] == "fused" else separate()


def norm_qkv_rope(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  bias: torch.Tensor | None, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                  way: tuple[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(q [M, heads, D] after RoPE, x + residual): the attention block's input norm, fused q/k/v
    projection, (Qwen3's q/k norm,) RoPE and K/V store at `slot_mapping` (`rope_store_kv`).

    Up to 4 rows on GPU without q/k norm, one GEMV kernel does it all (`_qkv_rope_kernel`) where
    that measured faster than `norm_linear` then `rope_store_kv`; `way` ("fused", pairs per
    program) or ("separate", 0) forces one.
    """
    M, D = x.shape[0], k_cache.shape[-1]
    half = D // 2

    def separate(w=weight):
        qkv, res = norm_linear(x, norm_weight, eps, w, bias, residual)
        norms = qk_norm if qk_norm is not None else (None, None)
        return rope_store_kv(qkv, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping, *norms), res

    def fused(pairs, w=weight):
        q = torch.empty(M, num_heads, D, dtype=x.dtype, device=x.device)
        res_out = torch.empty_like(x) if residual is not None else None
        r = residual if residual is not None else x
        ro = res_out if res_out is not None else x
        kc, vc = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        _qkv_rope_kernel[((num_heads + 2 * num_kv_heads) * (half // pairs),)](
            x, r, norm_weight, ro, w, bias if bias is not None else w, q, cos, sin, slot_mapping, kc, vc,
            x.shape[1], x.stride(0), r.stride(0), ro.stride(0), w.stride(0), q.stride(0), cos.stride(0),
            kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), float(eps), M=M, M_P2=triton.next_power_of_2(M),
            NORM=True, HAS_RES=residual is not None, HAS_BIAS=bias is not None, H=num_heads, KVH=num_kv_heads,
            HALF=half, BLOCK_N=pairs, BLOCK_K=512, num_warps=4, num_stages=3, **pdl_kwargs(x))
        return q, res_out

    fusable = (_serves(x, weight) and M <= GEMV_MAX_M and qk_norm is None and half >= 8 and not half & (half - 1)
               and weight.shape[0] == (num_heads + 2 * num_kv_heads) * D
               and k_cache.dtype == v_cache.dtype == x.dtype and k_cache.stride(-1) == v_cache.stride(-1) == 1
               and k_cache.is_contiguous() and v_cache.is_contiguous()
               and cos.stride(-1) == sin.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
               and (residual is None or residual.stride(-1) == 1))
    def key():
        return ("qkv_rope", _m_bucket(M), *weight.shape, D, x.dtype, bias is not None, residual is not None,
                x.device.index)

    return _fused_or_separate(x, weight, fusable, key, fused, separate, (2, 8), 4, way)
