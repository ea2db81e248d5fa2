"""Teacher-forced passes of the engine's decoder over given token sequences, phase by phase.

The engine computes next-token distributions only where it samples. Measuring what an attention
change (skip-softmax thresholds, a new kernel) does to the model needs them at every position of
fixed sequences, computed the way a phase computes them: `step_tokens=None` is one packed prefill
forward over the whole sequences; `step_tokens <= 16` feeds each sequence in extend steps of that
many tokens over the paged cache the earlier steps filled, as decode and speculative verification
do (the attention op picks its kernel by the step's longest query run, see kernels/attention.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slipstream.models.decoder import AttentionMetadata, Decoder

__all__ = ["ForcedStep", "next_token_kl", "teacher_forced_steps"]


@dataclass
class ForcedStep:
    """The rows one forward computed, sequence by sequence, positions in order."""

    seq_index: torch.Tensor  # [rows] long: which input sequence each row belongs to
    positions: torch.Tensor  # [rows] long: the row's position in its sequence
    hidden: torch.Tensor  # [rows, hidden] final-normed; `decoder.compute_logits` gives the next-token logits


@torch.inference_mode()
def teacher_forced_steps(decoder: Decoder, sequences: list[list[int]], step_tokens: int | None = None, *,
                         skip_scale: float = 0.0, counters: torch.Tensor | None = None,
                         block_size: int = 16) -> Iterator[ForcedStep]:
    """Run `sequences` through `decoder` over a fresh paged KV cache and yield each forward's rows.

    `step_tokens=None`: one forward over every token of every sequence (prefill). Otherwise each
    forward takes the next `step_tokens` tokens of every unfinished sequence. `skip_scale` is the
    skip-softmax scale of every forward (0: dense); `counters` ([2] int64 on the decoder's device)
    accumulates the (skipped, visited) key tiles.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("teacher_forced_steps needs at least one sequence and no empty sequence")
    if step_tokens is not None and step_tokens < 1:
        raise ValueError(f"step_tokens must be None (one prefill forward) or >= 1, got {step_tokens}")
    lengths = [len(s) for s in sequences]
    limit = decoder.config.max_position_embeddings
    if max(lengths) > limit:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the model's max_position_embeddings={limit}")
    device = decoder.embed.weight.device
    num_blocks = [-(-n // block_size) for n in lengths]
    kv_caches = decoder.allocate_kv_cache(sum(num_blocks), block_size)
    starts = [sum(num_blocks[:i]) for i in range(len(sequences))]
    tables = [list(range(start, start + n)) for start, n in zip(starts, num_blocks)]
    step = step_tokens or max(lengths)
    done = [0] * len(sequences)
    while True:
        active = [s for s, n in enumerate(lengths) if done[s] < n]
        if not active:
            return
        q_lens = [min(step, lengths[s] - done[s]) for s in active]
        attn = AttentionMetadata.build(q_lens, [done[s] + q for s, q in zip(active, q_lens)],
                                       [tables[s] for s in active], block_size, device)
        attn.skip_scale, attn.counters = skip_scale, counters
        spans = [(s, range(done[s], done[s] + q)) for s, q in zip(active, q_lens)]
        ids = torch.tensor([sequences[s][p] for s, span in spans for p in span], device=device)
        positions = torch.tensor([p for _, span in spans for p in span], device=device)
        seq_index = torch.tensor([s for s, span in spans for _ in span], device=device)
        hidden = decoder(ids, positions, attn, kv_caches)
        for s, q in zip(active, q_lens):
            done[s] += q
        yield ForcedStep(seq_index, positions, hidden)


@torch.inference_mode()
def next_token_kl(decoder: Decoder, ref_hidden: torch.Tensor, hidden: torch.Tensor,
                  chunk_rows: int = 2048) -> torch.Tensor:
    """KL(P_ref || P) [rows] (nats, float32) between the next-token distributions of matching rows.

    Logits are computed `chunk_rows` rows at a time: [rows, vocab] float32 at once would not fit
    for long packed prefills.
    """
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"hidden states of different shapes: {tuple(ref_hidden.shape)} vs {tuple(hidden.shape)}")
    out = []
    for i in range(0, hidden.shape[0], chunk_rows):
        ref = F.log_softmax(decoder.compute_logits(ref_hidden[i : i + chunk_rows]), dim=-1)
        other = F.log_softmax(decoder.compute_logits(hidden[i : i + chunk_rows]), dim=-1)
        out.append(F.kl_div(other, ref, log_target=True, reduction="none").sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
