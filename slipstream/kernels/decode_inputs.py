"""The inputs of decode step k of a multi-step CUDA-graph replay, in one kernel.

A replay runs several decode steps, each feeding its draws to the next on the device. Step k's
token ids, positions, context lengths (int32, for attention) and KV slots follow from the
replay's inputs: position = position_0 + k, length = length_0 + k, and the slot is the block
table's entry for that position. In torch that is about ten tiny kernels per step; here it is one.
A second kernel ends the replay: it writes the next replay's inputs over this one's, so that a
replay of the same sequences can be launched before the host has read the draws.
"""

from __future__ import annotations

import torch

from slipstream.kernels.fused_ops import use_triton
from slipstream.kernels.pdl import pdl_kwargs

try:
    import triton
    import triton.language as tl

    from slipstream.kernels.pdl import pdl_prologue
except ImportError:  # CPU-only installs run the torch path
    triton = None


def decode_inputs_torch(tokens: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, step: int, block_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = positions + step
    block = block_tables.gather(1, (pos // block_size)[:, None].long()).squeeze(1).long()
    return tokens.long(), pos, (seq_lens + step).to(torch.int32), block * block_size + pos % block_size


if triton is not None:

    @triton.jit
    def _decode_inputs_kernel(tok_ptr, pos_ptr, len_ptr, table_ptr, ids_out, pos_out, len_out, slot_out, B, width,
                              step, block_size, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < B
        pos = tl.load(pos_ptr + rows, mask=mask, other=0).to(tl.int64) + step
        block = tl.load(table_ptr + rows.to(tl.int64) * width + pos // block_size, mask=mask, other=0).to(tl.int64)
        tl.store(ids_out + rows, tl.load(tok_ptr + rows, mask=mask, other=0).to(tl.int64), mask=mask)
        tl.store(pos_out + rows, pos, mask=mask)
        tl.store(len_out + rows, (tl.load(len_ptr + rows, mask=mask, other=1) + step).to(tl.int32), mask=mask)
        tl.store(slot_out + rows, block * block_size + pos % block_size, mask=mask)


def decode_inputs(tokens: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                  step: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids int64, positions int64, seq_lens int32, slots int64) [B] of decode step `step`.

    tokens [B] (any dtype holding integers, e.g. the sampler's float64 draws) are the step's
    inputs; positions / seq_lens [B] and block_tables [B, width] are those of step 0, whose
    tables must already cover position + step.
    """
    B = tokens.shape[0]
    if not use_triton(tokens) or block_tables.stride(-1) != 1 or block_tables.dim() != 2:
        return decode_inputs_torch(tokens, positions, seq_lens, block_tables, step, block_size)
    dev = tokens.device
    ids, pos = torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, dtype=torch.int64, device=dev)
    lens, slots = torch.empty(B, dtype=torch.int32, device=dev), torch.empty(B, dtype=torch.int64, device=dev)
    if B:
        block = min(1024, triton.next_power_of_2(B))
        _decode_inputs_kernel[(triton.cdiv(B, block),)](
            tokens, positions, seq_lens, block_tables, ids, pos, lens, slots, B, block_tables.stride(0), step,
            block_size, BLOCK=block, num_warps=4, **pdl_kwargs(tokens))
    return ids, pos, lens, slots


def advance_replay_inputs_torch(ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                                seed: torch.Tensor, tokens: torch.Tensor, steps: int) -> None:
    step = (seq_lens > 1).to(positions.dtype) * steps
    ids.copy_(tokens)
    positions.add_(step)
    seq_lens.add_(step)
    seed.add_(steps)


if triton is not None:

    @triton.jit
    def _advance_kernel(ids_ptr, pos_ptr, len_ptr, seed_ptr, tok_ptr, B, steps, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
        pdl_prologue(PDL)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < B
        lens = tl.load(len_ptr + rows, mask=mask, other=1)
        step = tl.where(lens > 1, steps, 0)
        tl.store(ids_ptr + rows, tl.load(tok_ptr + rows, mask=mask, other=0).to(ids_ptr.dtype.element_ty), mask=mask)
        tl.store(pos_ptr + rows, tl.load(pos_ptr + rows, mask=mask, other=0) + step, mask=mask)
        tl.store(len_ptr + rows, lens + step, mask=mask)
        if tl.program_id(0) == 0:
            tl.store(seed_ptr, tl.load(seed_ptr) + steps)


def advance_replay_inputs(ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, seed: torch.Tensor,
                          tokens: torch.Tensor, steps: int) -> None:
    """In place, at the end of a replay of `steps` decode steps: the next replay's inputs, so that
    it can start before the host has read this one's draws. ids [B] <- tokens (the last step's
    draws); positions and seq_lens [B] advance by `steps`, except on padding rows (seq_lens 1: a
    decoding sequence has at least 2 tokens), which stay in the scratch block; seed [1] advances
    by `steps`, as the per-step seeds of the replay did."""
    B = ids.shape[0]
    if not use_triton(ids):
        return advance_replay_inputs_torch(ids, positions, seq_lens, seed, tokens, steps)
    if B:
        block = min(1024, triton.next_power_of_2(B))
        _advance_kernel[(triton.cdiv(B, block),)](ids, positions, seq_lens, seed, tokens, B, steps, BLOCK=block,
                                                  num_warps=4, **pdl_kwargs(ids))
