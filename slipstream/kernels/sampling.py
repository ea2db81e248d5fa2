"""Fused sampling for rows without top-k/top-p: temperature, draw and log-prob in one pass over the vocabulary.

One program per row streams the logits once: an online log-sum-exp of logits / T, and the Gumbel-max
draw argmax(logits / T + G) with G = -log(-log U), U uniform from Philox keyed by (seed, row, token),
which draws token i with probability softmax(logits / T)_i. Greedy rows (T = 0) take the argmax of
the raw logits and report its log-softmax, as `slipstream.rollout.sampler.sample` does. The result
of a row depends only on the seed, its row index and its logits, never on the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, tok_ptr, lp_ptr, stride, V, seed, seed_ptr, BLOCK: tl.constexpr,
                   SEED_FROM_PTR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if SEED_FROM_PTR:  # a CUDA graph replays the launch: the seed must come from memory
        seed = tl.load(seed_ptr)
    t = tl.load(temp_ptr + row).to(tl.float32)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        u = tl.rand(seed, (row * V + cols).to(tl.int32))
        g = tl.where(greedy, x, x - tl.log(-tl.log(u)))
        g = tl.where(mask, g, float("-inf"))
        blk = tl.max(g, 0)
        idx = tl.argmax(g, 0).to(tl.int64) + start
        take = blk > best  # strict: the first maximum wins, as torch.argmax
        best_idx = tl.where(take, idx, best_idx)
        best = tl.where(take, blk, best)
    x_best = tl.load(logits_ptr + row * stride + best_idx).to(tl.float32) * inv_t
    tl.store(tok_ptr + row, best_idx)
    tl.store(lp_ptr + row, x_best - m - tl.log(s))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor,
                 seed: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N] long, logprobs [N] float32) drawn from softmax(logits / temperature); greedy where T = 0.

    `seed`: an int, or a one-element integer tensor on the logits' device read by the kernel (graphs).
    """
    if logits.dim() != 2 or temperature.shape != (logits.shape[0],):
        raise ValueError(f"need logits [N, V] and temperature [N], got {tuple(logits.shape)} and "
                         f"{tuple(temperature.shape)}")
    N, V = logits.shape
    if N * V >= 2**31:
        raise ValueError(f"{N} rows x {V} tokens exceeds the sampler's 32-bit random offsets; sample in chunks")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    tokens = torch.empty(N, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        from_ptr = isinstance(seed, torch.Tensor)
        _sample_kernel[(N,)](logits, temperature, tokens, logprobs, logits.stride(0), V,
                             0 if from_ptr else seed % (2**31 - 1), seed if from_ptr else tokens,
                             BLOCK=min(4096, triton.next_power_of_2(V)), SEED_FROM_PTR=from_ptr, num_warps=8)
    return tokens, logprobs
