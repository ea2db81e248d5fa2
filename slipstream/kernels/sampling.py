"""Fused sampling for rows without top-k/top-p: temperature, draw and log-prob in one pass over the vocabulary.

Each row's vocabulary is cut into chunks scanned by parallel programs (a single program per row
would leave the GPU idle at batch 1: 150 us for a 152k vocabulary on an H200). A chunk yields its
online log-sum-exp of logits / T and its best Gumbel-max candidate argmax(logits / T + G),
G = -log(-log U), U uniform from Philox keyed by (seed, row, token); a second kernel merges the
chunks. The winner is drawn with probability softmax(logits / T)_i. Greedy rows (T = 0) take the argmax of
the raw logits and report its log-softmax, as `slipstream.rollout.sampler.sample` does. The result
of a row depends only on the seed, its row index and its logits, never on the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels.pdl import pdl_kwargs, pdl_prologue


@triton.jit
def _sample_partial_kernel(logits_ptr, temp_ptr, part_ptr, stride, V, CHUNK, seed, seed_ptr, C: tl.constexpr,
                           BLOCK: tl.constexpr, SEED_FROM_PTR: tl.constexpr, PDL: tl.constexpr):
    """Program (row, c) scans tokens [c * CHUNK, (c + 1) * CHUNK): its max and sum of exp of
    logits / T, and its best Gumbel-perturbed token, into part[row, :, c]."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if SEED_FROM_PTR:  # a CUDA graph replays the launch: the seed must come from memory (`seed`: an offset)
        seed = tl.load(seed_ptr) + seed
    t = tl.load(temp_ptr + row).to(tl.float32)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hi
        x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
        u = tl.rand(seed, (row * V + cols).to(tl.int32))
        g = tl.where(greedy, x, x - tl.log(-tl.log(u)))
        g = tl.where(mask, g, float("-inf"))
        blk = tl.max(g, 0)
        idx = tl.argmax(g, 0).to(tl.int64) + start
        take = blk > best  # strict: the first maximum wins, as torch.argmax
        best_idx = tl.where(take, idx, best_idx)
        best = tl.where(take, blk, best)
    base = part_ptr + row * 4 * C + c
    tl.store(base, m)
    tl.store(base + C, s)
    tl.store(base + 2 * C, best)
    tl.store(base + 3 * C, best_idx.to(tl.float32))


@triton.jit
def _sample_reduce_kernel(logits_ptr, temp_ptr, part_ptr, tok_ptr, lp_ptr, stride, C: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(temp_ptr + row).to(tl.float32)
    inv_t = tl.where(t <= 0.0, 1.0, 1.0 / tl.where(t <= 0.0, 1.0, t))
    cs = tl.arange(0, C)
    base = part_ptr + row * 4 * C + cs
    m = tl.load(base)
    s = tl.load(base + C)
    g = tl.load(base + 2 * C)
    idx = tl.load(base + 3 * C)
    m_all = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - m_all)), 0)
    tok = tl.sum(tl.where(cs == tl.argmax(g, 0), idx, 0.0), 0).to(tl.int64)  # first chunk on ties
    x = tl.load(logits_ptr + row * stride + tok).to(tl.float32) * inv_t
    tl.store(tok_ptr + row, tok.to(tok_ptr.dtype.element_ty))
    tl.store(lp_ptr + row, (x - m_all - tl.log(total)).to(lp_ptr.dtype.element_ty))


def _num_chunks(n_rows: int, vocab: int, block: int) -> int:
    """Chunks per row: about four programs per SM of an H100/H200 in all, no chunk under one block."""
    want = triton.next_power_of_2(max(1, -(-512 // max(n_rows, 1))))
    return max(1, min(64, want, triton.next_power_of_2(-(-vocab // block))))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int | torch.Tensor,
                 seed_offset: int = 0, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N] long, logprobs [N] float32) drawn from softmax(logits / temperature); greedy where T = 0.

    `seed`: an int, or a one-element integer tensor on the logits' device read by the kernel (graphs),
    plus `seed_offset`. `out`: a float64 [2, N] tensor that receives the tokens and log-probs
    (returned as its two rows), so that a graph's steps need no copies to stack their draws.
    The vocabulary of each row is cut into chunks scanned in parallel, then merged; the draw of a
    row does not depend on the chunking.
    """
    if logits.dim() != 2 or temperature.shape != (logits.shape[0],):
        raise ValueError(f"need logits [N, V] and temperature [N], got {tuple(logits.shape)} and "
                         f"{tuple(temperature.shape)}")
    N, V = logits.shape
    if N * V >= 2**31:
        raise ValueError(f"{N} rows x {V} tokens exceeds the sampler's 32-bit random offsets; sample in chunks")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if out is not None:
        if out.shape != (2, N) or out.dtype != torch.float64 or out.stride(-1) != 1:
            raise ValueError(f"out must be a float64 [2, {N}] tensor with unit stride, got {out.dtype} "
                             f"{tuple(out.shape)}")
        tokens, logprobs = out[0], out[1]
    else:
        tokens = torch.empty(N, dtype=torch.int64, device=logits.device)
        logprobs = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        block = min(1024, triton.next_power_of_2(V))
        C = _num_chunks(N, V, block)
        chunk = -(-V // (C * block)) * block
        part = torch.empty(N, 4, C, dtype=torch.float32, device=logits.device)
        from_ptr = isinstance(seed, torch.Tensor)
        _sample_partial_kernel[(N, C)](logits, temperature, part, logits.stride(0), V, chunk,
                                       seed_offset if from_ptr else (seed + seed_offset) % (2**31 - 1),
                                       seed if from_ptr else tokens,
                                       C=C, BLOCK=block, SEED_FROM_PTR=from_ptr, num_warps=4, **pdl_kwargs(logits))
        _sample_reduce_kernel[(N,)](logits, temperature, part, tokens, logprobs, logits.stride(0), C=C, num_warps=1,
                                    **pdl_kwargs(logits))
    return tokens, logprobs
