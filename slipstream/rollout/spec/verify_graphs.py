"""Verification forwards replayed from CUDA graphs, one per (batch bucket, query width).

A verification step in the long tail is a handful of sequences with up to 16 query tokens each:
like a decode step, its cost is launching a few hundred tiny kernels, so it replays a captured
graph as decode steps do (`rollout/cuda_graph.py`, whose layout this follows). Shapes are fixed
per graph: B sequences (the decode buckets) x Q query rows (2, 4, 8 or 16: the step's longest
draft + 1, rounded up). Inputs come from one static int64 buffer, filled on the host in a pinned
twin and moved by ONE copy: [input_ids | positions | slots] (B*Q each), then seq_lens (B), then
the block tables (B x width).

Padding, and why it is harmless:

* a sequence with a draft of k < Q - 1 tokens gets Q - 1 - k padding rows after its real ones.
  Attention is causal within the query, so real rows never see them; their K/V go to the scratch
  block (which the block manager never hands out), so the cache is untouched; their outputs are
  never read (verification reads row j only for j <= k);
* padding sequences (B - n of them) decode token 0 at positions 0..Q-1 of the scratch block;
* a sequence's table is filled past its last block with the scratch block, and the width covers
  max_model_len + Q positions: a padding row past the sequence's blocks reads the scratch block,
  never past the table.

The graph ends with the logits of every row (and, with `capture_layers`, the hidden states of
those layers for a learned drafter: `captured`, read with `last_inputs` before the next replay);
verification runs after it. On CPU the same padded static forward runs eagerly (`capture=False`),
which is how the tests check the layout.
"""

from __future__ import annotations

import numpy as np
import torch

from slipstream.kernels.attention import MAX_DECODE_Q_LEN
from slipstream.models.decoder import AttentionMetadata, Decoder
from slipstream.rollout.cuda_graph import capture_graph, count_capture, default_buckets
from slipstream.rollout.scheduler import ScheduledSeq

QUERY_WIDTHS = (2, 4, 8, 16)
assert QUERY_WIDTHS[-1] == MAX_DECODE_Q_LEN


class VerifyGraphs:
    def __init__(self, decoder: Decoder, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_model_len: int, scratch_block: int, max_batch: int, *, capture: bool = True,
                 skip_scale: float = 0.0, counters: torch.Tensor | None = None,
                 capture_layers: tuple[int, ...] = ()):
        self.decoder, self.kv_caches, self.block_size = decoder, kv_caches, block_size
        self.capture_layers = tuple(capture_layers)
        self.captured: dict[int, torch.Tensor] = {}  # hidden states [B * Q, H] of the last replay
        self.device = decoder.embed.weight.device
        self.buckets = default_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.width = -(-(max_model_len + QUERY_WIDTHS[-1]) // block_size)
        self.scratch_block = scratch_block
        self.capture_enabled = capture
        self.skip_scale, self.counters = skip_scale, counters
        n = self.max_batch * (3 * QUERY_WIDTHS[-1] + 1 + self.width)
        self.staging = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self.host_np = self.host.numpy()
        # (B, Q) -> (graph, logits, captured hidden states)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None, dict]] = {}
        self.last_shape: tuple[int, int] | None = None
        self.pool = None

    def shape_for(self, num_seqs: int, max_draft: int) -> tuple[int, int] | None:
        """(B, Q) of the graph for a step, None when no graph holds it (the step runs eagerly)."""
        B = next((b for b in self.buckets if b >= num_seqs), None)
        Q = next((q for q in QUERY_WIDTHS if q >= max_draft + 1), None)
        return None if B is None or Q is None or num_seqs == 0 else (B, Q)

    def _views(self, B: int, Q: int) -> tuple[torch.Tensor, ...]:
        s, R = self.staging, B * Q
        ids, pos, slots = (s[i * R:(i + 1) * R] for i in range(3))
        lens = s[3 * R:3 * R + B]
        tables = s[3 * R + B:3 * R + B + B * self.width].view(B, self.width)
        return ids, pos, slots, lens, tables

    def _forward(self, B: int, Q: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        ids, pos, slots, lens, tables = self._views(B, Q)
        cu = torch.arange(0, (B + 1) * Q, Q, dtype=torch.int32, device=self.device)
        attn = AttentionMetadata(cu, lens.to(torch.int32), tables.to(torch.int32), slots, max_q_len=Q,
                                 skip_scale=self.skip_scale, counters=self.counters if self.skip_scale > 0 else None)
        if self.capture_layers:
            hidden, captured = self.decoder(ids, pos, attn, self.kv_caches, capture_layers=self.capture_layers)
        else:
            hidden, captured = self.decoder(ids, pos, attn, self.kv_caches), {}
        return self.decoder.compute_logits(hidden), captured

    def _fill(self, entries: list[ScheduledSeq], B: int, Q: int) -> None:
        """Write the step's inputs (padded to B sequences x Q rows) into the pinned host buffer."""
        h, bs, W, R = self.host_np, self.block_size, self.width, B * Q
        ids, pos, slots = h[:R].reshape(B, Q), h[R:2 * R].reshape(B, Q), h[2 * R:3 * R].reshape(B, Q)
        lens, tables = h[3 * R:3 * R + B], h[3 * R + B:3 * R + B + B * W].reshape(B, W)
        j = np.arange(Q)
        scratch = self.scratch_block * bs + j % bs
        for i, e in enumerate(entries):
            seq, k = e.seq, len(e.draft)
            table = seq.block_table
            p = e.start + j
            ids[i, 0] = seq.last_token
            ids[i, 1:k + 1] = e.draft
            ids[i, k + 1:] = 0
            pos[i] = p
            blocks = np.asarray(table, dtype=np.int64)[p[:k + 1] // bs]
            slots[i, :k + 1] = blocks * bs + p[:k + 1] % bs
            slots[i, k + 1:] = scratch[k + 1:]
            lens[i] = e.start + Q
            tables[i, :len(table)] = table
            tables[i, len(table):] = self.scratch_block
        n = len(entries)
        ids[n:] = 0
        pos[n:] = j
        slots[n:] = scratch
        lens[n:] = Q
        tables[n:] = self.scratch_block

    def _capture(self, B: int, Q: int) -> None:
        count_capture()
        self.host_np[:] = 0
        self._fill([], B, Q)
        self.staging.copy_(self.host)
        if not self.capture_enabled:
            self.graphs[(B, Q)] = (None, None, {})
            return
        graph, (logits, captured) = capture_graph(lambda: self._forward(B, Q), self.device, self.pool)
        self.pool = graph.pool()
        self.graphs[(B, Q)] = (graph, logits, captured)

    def capture_all(self) -> None:
        for B in self.buckets:
            for Q in QUERY_WIDTHS:
                if (B, Q) not in self.graphs:
                    self._capture(B, Q)

    def replay(self, entries: list[ScheduledSeq], B: int, Q: int) -> torch.Tensor:
        """Logits [B, Q, vocab] of a verification step (a static tensor: read it before the next
        replay); row (i, j) is entry i's j-th query token: the last sampled token, then its draft."""
        if (B, Q) not in self.graphs:
            self._capture(B, Q)
        self._fill(entries, B, Q)
        size = 3 * B * Q + B + B * self.width
        self.staging[:size].copy_(self.host[:size], non_blocking=True)
        graph, logits, captured = self.graphs[(B, Q)]
        if graph is None:
            logits, captured = self._forward(B, Q)
        else:
            graph.replay()
        self.captured, self.last_shape = captured, (B, Q)
        return logits.view(B, Q, -1)

    def last_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) [B * Q] of the last replay (views of the static buffers): row
        i * Q + j is entry i's j-th query token."""
        ids, pos, *_ = self._views(*self.last_shape)
        return ids, pos
