"""Paged decode / extend attention in Triton: 1..16 query tokens per sequence (decode, speculative verify).

One program owns one (sequence, kv head, context split). Its query tile packs every query token of
the sequence and every query head of the kv head's GQA group: row r is token r // group, head
kv_head * group + r % group, padded to a power of two >= 16 rows, so each K/V tile is read once for
the whole group. The program walks its part of the context in key tiles of BLOCK_N tokens gathered
through the block table (a tile may span several pages, or sit inside one) with FlashAttention's
online softmax, in base 2 (scores are pre-multiplied by scale * log2(e)).

Split-K ("flash-decoding"): for long contexts the key tiles of each sequence are cut into up to
NUM_SPLITS contiguous parts, each part writes its partial (max, sum, unnormalised output) to
float32 scratch, and `_combine_splits_kernel` merges them. The split count is a launch-time
heuristic (`choose_num_splits`); a sequence shorter than MIN_TILES tiles per split uses fewer.

Skip-softmax (BLASST): with SKIP, a key tile whose row maxima all satisfy
m_tile < m_running + log2(lambda), lambda = skip_scale / seq_len, is dropped before the
exponentials, the V load and the P.V product. SKIP is a constexpr, so skip_scale == 0 runs the
dense kernel. A split other than the first starts its running maximum (for the skip test only)
at each row's score of key 0: any key's score is a lower bound of the row's true maximum, so the
test keeps its meaning, and key 0 (the sequence's first token) is where decoder models park most
attention, so a split can skip from its first tile on instead of needing its own history first.
With COUNT, the program atomically adds (skipped tiles, visited tiles) to a counter pair.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slipstream.kernels.attention import MAX_DECODE_Q_LEN, decode_block_n
from slipstream.kernels.pdl import pdl_kwargs, pdl_prologue

LOG2E = 1.0 / math.log(2.0)

# A split may be a single tile: at small batch the programs of one sequence are all the GPU has to
# run in parallel (batch 1, 384 tokens of context: 11.5 us per layer with 4 tiles a split on an H200).
DEFAULT_MIN_TILES_PER_SPLIT = 1
MAX_SPLITS = 64
# Skip-softmax decode splits further, down to 2 tiles a part (H200, 128-key tiles, 70% skipped,
# batch 1: 64k 0.071 ms with 128 splits against 0.085 with 32; at 8k, batch 8, splits of one
# tile took 0.083 ms against 0.073 with two).
SKIP_MAX_SPLITS = 128
SKIP_MIN_TILES_PER_SPLIT = 2
MAX_Q_LEN = MAX_DECODE_Q_LEN


@triton.jit
def _attend_tile(acc, l_i, m_i, qk, qk_scale, m_tile, v_ptrs, kv_mask, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Online-softmax update with one key tile: qk are the raw dot products (-inf where masked),
    qk * qk_scale the base-2 scores, m_tile their row maxima."""
    m_new = tl.maximum(m_i, m_tile)
    # Rows that have seen no visible key yet keep m = -inf; shift them by 0 so no inf - inf appears.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(qk * qk_scale - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=kv_mask[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tile_pages(bt_row, t, kv_end, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """Block-table entries of key tile t's keys (0 past kv_end)."""
    n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(bt_row + n // PAGE, mask=n < kv_end, other=0)


@triton.jit
def _attention_tile(acc, l_i, m_i, n_skipped, q, t, kv_end, row_valid, pos, m_ref, log2_lambda, qk_scale,
                    bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                    MASKED: tl.constexpr, SKIP: tl.constexpr, DOT_PRECISION: tl.constexpr, page_given=None):
    """Key tile t (keys t * BLOCK_N ..., gathered through the block table, or from the block-table
    entries `page_given` the caller loaded) into the online softmax.
    MASKED: the tile crosses kv_end or a row's causal position (else every row sees all of it).
    SKIP: the skip test against max(running max, m_ref)."""
    n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    kv_mask = n < kv_end
    if page_given is not None:
        page = page_given.to(tl.int64)
    elif MASKED:
        page = tl.load(bt_row + n // PAGE, mask=kv_mask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + n // PAGE).to(tl.int64)
    slot = n % PAGE
    k_ptrs = k_head + page[None, :] * stride_kb + slot[None, :] * stride_ks + d[:, None]  # [HEAD_DIM, BLOCK_N]
    v_ptrs = v_head + page[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=kv_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where(row_valid[:, None] & (n[None, :] <= pos[:, None]), qk, float("-inf"))
    # Scaling the row maxima instead of the tile gives the same m_tile (rounding is monotonic and
    # qk_scale > 0) and spares a skipped tile a multiply per score.
    m_tile = tl.max(qk, 1) * qk_scale
    if SKIP:
        # Padding rows, and rows that see no key of this tile, never block the skip.
        row_skip = (m_tile < tl.maximum(m_i, m_ref) + log2_lambda) | (m_tile == float("-inf")) | (row_valid == 0)
        tile_skip = tl.min(row_skip.to(tl.int32), 0)
        if tile_skip == 0:
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, qk, qk_scale, m_tile, v_ptrs, kv_mask, MASKED, DOT_PRECISION)
        n_skipped += tile_skip
    else:
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, qk, qk_scale, m_tile, v_ptrs, kv_mask, MASKED, DOT_PRECISION)
    return acc, l_i, m_i, n_skipped


@triton.jit
def _walk_tiles(acc, l_i, m_i, n_skipped, q, t_begin, n_full, t_end, kv_end, row_valid, pos, m_ref, log2_lambda,
                qk_scale, bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SKIP: tl.constexpr,
                PREFETCH_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key tiles t_begin .. t_end - 1 into the online softmax: those before n_full, which every query
    row sees whole, without masks, then the rest. Shared by the decode and prefill kernels.
    PREFETCH_PAGES: the next tile's block-table entries load a tile ahead, so K's addresses are known
    when the pipelined loop fetches it (H200, dense causal prefill: 23.3 -> 20.2 ms at 32k; slower
    in decode, which holds fewer programs per SM with it, and in skip-softmax prefill)."""
    if PREFETCH_PAGES:
        page = _tile_pages(bt_row, t_begin, kv_end, BLOCK_N, PAGE)
        for t in range(t_begin, n_full):
            page_next = _tile_pages(bt_row, t + 1, kv_end, BLOCK_N, PAGE)
            acc, l_i, m_i, n_skipped = _attention_tile(
                acc, l_i, m_i, n_skipped, q, t, kv_end, row_valid, pos, m_ref, log2_lambda, qk_scale,
                bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
                HEAD_DIM, BLOCK_N, PAGE, False, SKIP, DOT_PRECISION, page)
            page = page_next
    else:
        for t in range(t_begin, n_full):
            acc, l_i, m_i, n_skipped = _attention_tile(
                acc, l_i, m_i, n_skipped, q, t, kv_end, row_valid, pos, m_ref, log2_lambda, qk_scale,
                bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
                HEAD_DIM, BLOCK_N, PAGE, False, SKIP, DOT_PRECISION)
    for t in range(n_full, t_end):
        acc, l_i, m_i, n_skipped = _attention_tile(
            acc, l_i, m_i, n_skipped, q, t, kv_end, row_valid, pos, m_ref, log2_lambda, qk_scale,
            bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
            HEAD_DIM, BLOCK_N, PAGE, True, SKIP, DOT_PRECISION)
    return acc, l_i, m_i, n_skipped


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    cu_ptr, lens_ptr, bt_ptr,
    m_part_ptr, l_part_ptr, acc_part_ptr, cnt_ptr,
    qk_scale, skip_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    num_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIN_TILES: tl.constexpr,
    SKIP: tl.constexpr,
    COUNT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    ctx = tl.load(lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_valid = tok < q_len
    pos = ctx - q_len + tok  # causal position of each query row
    q_rows = (q_start + tok).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None], other=0.0)

    # This split's key tiles: the sequence's tiles cut into NUM_SPLITS parts of >= MIN_TILES tiles.
    n_tiles = tl.where(q_len > 0, tl.cdiv(ctx, BLOCK_N), 0)
    per_split = tl.maximum(tl.cdiv(n_tiles, NUM_SPLITS), MIN_TILES)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_skipped = t_begin * 0

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    log2_lambda = 0.0
    # The skip test's reference maximum: the running maximum, and in later splits also the score of
    # key 0 (one key row loaded, scored like the tiles: the same dot, other keys masked).
    m_ref = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if SKIP:
        # log2(lambda), lambda = skip_scale / seq_len: this sequence's threshold.
        log2_lambda = tl.log2(skip_scale / ctx.to(tl.float32))
        if (t_begin > 0) & (t_begin < t_end):
            key0 = offs_n == 0
            page0 = tl.load(bt_row).to(tl.int64)
            k0 = tl.load(k_head + page0 * stride_kb + d[:, None] + offs_n[None, :] * 0, mask=key0[None, :],
                         other=0.0)
            s0 = tl.dot(q, k0, input_precision=DOT_PRECISION) * qk_scale
            s0 = tl.where(row_valid[:, None] & key0[None, :], s0, float("-inf"))
            m_ref = tl.max(s0, 1)
    # Tiles whose every key is visible to every query row need no masks (the rest: the causal tail).
    n_full = tl.minimum(tl.maximum((ctx - q_len + 1) // BLOCK_N, t_begin), t_end)
    acc, l_i, m_i, n_skipped = _walk_tiles(
        acc, l_i, m_i, n_skipped, q, t_begin, n_full, t_end, ctx, row_valid, pos, m_ref, log2_lambda, qk_scale,
        bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
        HEAD_DIM, BLOCK_N, PAGE, SKIP, False, DOT_PRECISION)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        part = (q_rows * num_heads + head) * NUM_SPLITS + split  # scratch [T, H, NUM_SPLITS(, D)]
        tl.store(m_part_ptr + part, m_i, mask=row_valid)
        tl.store(l_part_ptr + part, l_i, mask=row_valid)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_valid[:, None])

    if COUNT:
        if SKIP:
            tl.atomic_add(cnt_ptr, n_skipped)
        tl.atomic_add(cnt_ptr + 1, tl.maximum(t_end - t_begin, 0))


@triton.jit
def _combine_splits_kernel(
    m_part_ptr, l_part_ptr, acc_part_ptr, o_ptr,
    stride_ot, stride_oh,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P2)
    sp_mask = sp < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM)
    part = (row * num_heads + head) * NUM_SPLITS + sp
    m = tl.load(m_part_ptr + part, mask=sp_mask, other=float("-inf"))
    l = tl.load(l_part_ptr + part, mask=sp_mask, other=0.0)
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=sp_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)  # finite: the first split always sees key 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / denom
    tl.store(o_ptr + row * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


# Dense split-K fills at most one wave: as many programs as fit on the GPU at once (the compiled
# kernel's shared memory, registers and warps against the SM's), rounded down to whole splits. On an
# H200 (bf16, 32/8 heads, head dim 128; `benchmarks/decode_splits.py`) a launch just past a wave
# was the slowest (8 sequences of 32k, 12 splits = 1.16 waves: 0.328 ms against 0.260 with 8), one
# wave or a little less the fastest or within 2% of it, from 1 to 64 sequences and 1 to 16 query
# tokens, where aiming at 8 programs per SM (rounded up) had taken up to 15% longer (16 sequences
# of 32k with 16 query tokens: 0.650 ms against 0.567 with 2 splits, 2 programs fitting per SM).
# Where the fit cannot be read (Triton's interpreter, a Triton without the fields), the old aim.
PROGRAMS_PER_SM = 8
# With skip-softmax a kept tile's V load sits behind the skip test, which needs that tile's K: it
# cannot be fetched ahead, so more programs per SM hide its latency, in a power-of-two number of
# splits (H200, 64k contexts, batch 32, 70% of tiles skipped: skipped at random, 1.85 ms with 2
# splits and 1.55 ms with 8; kept where a tile holds a retrieval key, 1.41 ms with 2 or 8 but
# 1.61 ms with 5 and 1.50 ms with 9; dense takes 1.94 ms). With 128-key tiles, 16 splits at batch
# 32 (about 31 programs per SM) beat 8: 0.725 against 0.749 ms at 32k, 1.404 against 1.442 at 64k.
SKIP_PROGRAMS_PER_SM = 32


def choose_num_splits(batch: int, kv_heads: int, max_context: int, block_n: int, num_sms: int,
                      min_tiles_per_split: int = DEFAULT_MIN_TILES_PER_SPLIT, skip: bool = False,
                      resident_per_sm: int | None = None) -> int:
    """Context splits per (sequence, kv head), 1 for short contexts. Dense: as many as keep the
    programs within one wave of `resident_per_sm` programs per SM (without it, about
    PROGRAMS_PER_SM per SM), up to MAX_SPLITS. Skip-softmax: about SKIP_PROGRAMS_PER_SM per SM,
    rounded down to a power of two, up to SKIP_MAX_SPLITS parts of at least SKIP_MIN_TILES_PER_SPLIT tiles."""
    tiles = triton.cdiv(max(max_context, 1), block_n)
    pairs = max(batch * kv_heads, 1)
    if skip:
        most = min(SKIP_MAX_SPLITS, tiles // max(min_tiles_per_split, SKIP_MIN_TILES_PER_SPLIT))
    else:
        most = min(MAX_SPLITS, tiles // min_tiles_per_split)
    if most <= 1:
        return 1
    if skip:
        splits = min(triton.cdiv(SKIP_PROGRAMS_PER_SM * num_sms, pairs), most)  # >= 1
        return 1 << (splits.bit_length() - 1)
    if resident_per_sm:
        return max(1, min(resident_per_sm * num_sms // pairs, most))
    return min(triton.cdiv(PROGRAMS_PER_SM * num_sms, pairs), most)


_RESIDENT: dict[tuple, int | None] = {}


def programs_per_sm(compiled, device: torch.device) -> int:
    """Programs of a compiled, loaded Triton kernel that one SM holds at once: its warps, shared
    memory and registers against the SM's (AttributeError from a Triton without these fields)."""
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    fits = [props.max_threads_per_multi_processor // (32 * warps)]
    if compiled.metadata.shared:
        fits.append(props.shared_memory_per_multiprocessor // compiled.metadata.shared)
    if compiled.n_regs:
        fits.append(props.regs_per_multiprocessor // (compiled.n_regs * 32 * warps))
    return max(min(fits), 1)


def resident_programs_per_sm(kernel, device: torch.device, key: tuple, args: tuple, kwargs: dict) -> int | None:
    """`programs_per_sm` of `kernel` (a Triton JIT function, compiled for `args`/`kwargs` without a
    launch), cached under `key`; None where that cannot be read."""
    if key not in _RESIDENT:
        _RESIDENT[key] = None
        try:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()  # loads the binary: fills n_regs
            _RESIDENT[key] = programs_per_sm(compiled, device)
        except Exception:  # an interpreter or a Triton without these fields: the fallback aim
            pass
    return _RESIDENT[key]


def decode_block_m(max_q_len: int, group: int) -> int:
    """Query rows of a decode program: every query token of the GQA group, padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(max_q_len * group))


def decode_launch_config(block_m: int, block_n: int, head_dim: int, elem_size: int) -> tuple[int, int]:
    """(num_warps, num_stages) of the decode kernel by default."""
    num_warps = 8 if block_m * head_dim >= 128 * 128 else 4
    # Two K/V stages, one where they and the query tile would crowd shared memory (float32, big tiles).
    smem = (2 * 2 * block_n + block_m) * head_dim * elem_size
    return num_warps, 2 if smem <= 160 * 1024 else 1


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: exact float32 products (the default would be TF32 on tensor-core GPUs).
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                           skip_scale: float, counters: torch.Tensor | None) -> None:
    """The checks the decode and prefill wrappers share; ValueError names what is wrong."""
    H, D, KVH, Dk = q.shape[1], q.shape[2], k_cache.shape[2], k_cache.shape[3]
    if Dk != D or H % KVH or D < 16 or D & (D - 1):
        raise ValueError(f"need head_dim a power of two >= 16 and heads % kv_heads == 0 (q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)})")
    if skip_scale < 0:
        raise ValueError("skip_scale must be >= 0")
    if not scale > 0:  # the kernels scale row maxima, not scores: exact only for a positive scale
        raise ValueError(f"scale must be > 0, got {scale}")
    if counters is not None and (counters.shape != (2,) or counters.dtype not in (torch.int32, torch.int64)
                                 or counters.device != q.device):
        raise ValueError("counters must be an int32/int64 tensor of shape [2] on the queries' device")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache must share a dtype ({q.dtype}, {k_cache.dtype}, {v_cache.dtype})")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                           scale: float, *, max_q_len: int, skip_scale: float = 0.0,
                           counters: torch.Tensor | None = None, block_n: int | None = None,
                           num_splits: int | None = None,
                           min_tiles_per_split: int = DEFAULT_MIN_TILES_PER_SPLIT, num_warps: int | None = None,
                           num_stages: int | None = None) -> torch.Tensor:
    """Paged attention for sequences of at most 16 query tokens -> [T, heads, head_dim] in q.dtype.

    Same contract as `paged_attention_ref`. `block_n`: keys per tile (default `decode_block_n`,
    which differs with skip-softmax). `num_splits` forces the split-K factor (default: the
    `choose_num_splits` heuristic, whose context bound is the block table's width, so no host sync).
    """
    T, H, D = q.shape
    _, page, KVH, _ = k_cache.shape
    B = seq_lens.shape[0]
    if not 0 <= max_q_len <= MAX_Q_LEN:
        raise ValueError(f"max_q_len must be in 0..{MAX_Q_LEN}, got {max_q_len}")
    check_attention_inputs(q, k_cache, v_cache, scale, skip_scale, counters)
    block_n = decode_block_n(skip_scale > 0) if block_n is None else block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_n must be a power of two >= 16")
    cu_seqlens_q, seq_lens, block_tables = cu_seqlens_q.contiguous(), seq_lens.contiguous(), block_tables.contiguous()
    group = H // KVH
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    out = torch.empty_like(q)
    if T == 0 or B == 0 or max_q_len == 0:
        return out
    block_m = decode_block_m(max_q_len, group)
    default_warps, default_stages = decode_launch_config(block_m, block_n, D, q.element_size())
    num_warps = default_warps if num_warps is None else num_warps
    num_stages = default_stages if num_stages is None else num_stages
    constants = dict(GROUP=group, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
                     MIN_TILES=min_tiles_per_split, SKIP=skip_scale > 0, COUNT=counters is not None,
                     DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **pdl_kwargs(q))
    args = (q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
               block_tables.stride(0), H)
    if num_splits is None:
        resident = None
        if skip_scale == 0 and q.device.type == "cuda":
            key = (q.device, q.dtype, group, D, block_m, block_n, page, min_tiles_per_split, counters is not None,
                   num_warps, num_stages)
            resident = _RESIDENT.get(key)
            # Compiled outside graph capture (the engine's eager warm-up run comes first); a split
            # program's fit (NUM_SPLITS=2) stands for every split count: the same loop.
            if key not in _RESIDENT and not torch.cuda.is_current_stream_capturing():
                part = torch.empty(1, device=q.device, dtype=torch.float32)
                resident = resident_programs_per_sm(
                    _decode_kernel, q.device, key,
                    args + (part, part, part, cu_seqlens_q, float(scale) * LOG2E, 0.0) + strides,
                    dict(constants, NUM_SPLITS=2))
        num_splits = choose_num_splits(B, KVH, block_tables.shape[1] * page, block_n, sm_count(q.device),
                                       min_tiles_per_split, skip=skip_scale > 0, resident_per_sm=resident)
    if num_splits > 1:
        m_part = torch.empty(T, H, num_splits, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(T, H, num_splits, D, device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = out  # unused
    cnt = counters if counters is not None else cu_seqlens_q  # unused without COUNT
    _decode_kernel[(B, KVH, num_splits)](
        *args, m_part, l_part, acc_part, cnt, float(scale) * LOG2E, float(skip_scale), *strides,
        NUM_SPLITS=num_splits, **constants,
    )
    if num_splits > 1:
        _combine_splits_kernel[(T, H)](
            m_part, l_part, acc_part, out, out.stride(0), out.stride(1), H,
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits), HEAD_DIM=D,
            num_warps=4 if D >= 128 else 2, **pdl_kwargs(q),
        )
    return out
