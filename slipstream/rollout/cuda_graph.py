"""Decode steps replayed from CUDA graphs: one captured forward per batch-size bucket.

A decode step of a small model is a few hundred tiny kernels; launching them from Python costs
far more than running them. A captured graph launches them all at once. Graphs need fixed shapes
and fixed addresses, so every decode step is padded to the next bucket size and reads its inputs
from static buffers:

* one int64 staging buffer holds, for bucket B, [input_ids | positions | seq_lens |
  temperatures (float64 bits)] (B each), the sampling seed, then the block tables (B x
  max_blocks); the host fills a pinned twin and ONE copy moves it to the device, in the stream of
  the replay; each step's KV slots, int32 lengths and (after the first) positions come from it in
  one kernel (`slipstream.kernels.decode_inputs`);
* padding rows decode token 0 at position 0 of a one-token context in a scratch KV block that the
  block manager never hands out (the cache has `num_blocks + 1` blocks), so they write nothing
  that a real sequence reads;
* the block table width is fixed (max_model_len / block_size), so the attention kernel's grid is
  fixed; rows past a sequence's last block are never read.

The graph ends with the logits and, on GPU, the fused sampling kernel's draw for every row
(tokens and log-probs of each step written into one float64 [steps, 2, B] tensor, read back with one copy); steps with
top-k / top-p sample from the logits after the replay instead. `replay` returns static output
tensors: copy what must outlive the next step.

On CPU the same padded, static-buffer forward runs eagerly (`capture=False`): it is how the tests
check the padding, the scratch block and the buffer layout.

Captured hidden states (feature capture for a learned drafter) of several-step replays are written
by the graph itself into a device ring of rows (`feature_ring`), at a write offset the graph keeps
on the device and the host mirrors (`ring_written`). Nothing is launched between two chained
replays to save them: on an H200 any kernel launched there, even an unrelated one, cost the
replays after it the gain of programmatic dependent launch, 10% at batch 64
(`benchmarks/capture_overhead.py`). The host gathers the rows it needs later, where the chain ends.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from slipstream.kernels.decode_inputs import advance_replay_inputs, decode_inputs
from slipstream.models.decoder import AttentionMetadata, Decoder
from slipstream.rollout.sequence import Sequence


# The feature ring holds at least this many bytes of rows (and always two replays of the largest bucket).
FEATURE_RING_BYTES = 32 << 20

_captures = 0  # bucket graphs made in this process (static buffers only on CPU): one made mid-rollout stalls it


def captures_so_far() -> int:
    return _captures


def count_capture() -> None:
    global _captures
    _captures += 1


def capture_graph(fn, device: torch.device, pool=None):
    """(graph, fn's outputs) of `fn` captured in a CUDA graph: one eager warm-up run on a side
    stream first (it compiles the Triton kernels outside the capture); `pool` shares memory
    between the graphs of one engine."""
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 128, of 32 beyond; the last one >= max_batch."""
    out, b = [], 1
    while True:
        out.append(b)
        if b >= max_batch:
            return out
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 128 else 32)


class DecodeGraphs:
    def __init__(self, decoder: Decoder, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_model_len: int, scratch_block: int, max_batch: int, *, capture: bool = True,
                 skip_scale: float = 0.0, counters: torch.Tensor | None = None,
                 capture_layers: tuple[int, ...] = ()):
        self.decoder, self.kv_caches, self.block_size = decoder, kv_caches, block_size
        self.device = decoder.embed.weight.device
        self.buckets = default_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.width = -(-max_model_len // block_size)  # block-table columns
        self.scratch_block = scratch_block
        self.capture_enabled = capture
        self.skip_scale, self.counters, self.capture_layers = skip_scale, counters, tuple(capture_layers)
        n = self.max_batch * (4 + self.width) + 1
        self.staging = torch.zeros(n, dtype=torch.int64, device=self.device)
        pin = self.device.type == "cuda"
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.host_f64 = self.host_np.view(np.float64)
        # block tables of chained replays (`_upload_grown_tables`)
        self.table_hosts = [torch.zeros(self.max_batch * self.width, dtype=torch.int64, pin_memory=pin)
                            for _ in range(2)]
        self.table_flip, self.table_lengths = 0, []
        self.cu_seqlens = torch.arange(self.max_batch + 1, dtype=torch.int32, device=self.device)
        # (bucket, steps) -> (graph, logits, captured hidden states, draws)
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        self.last_bucket = 1
        # Several-step replays' captured rows: {layer: [ring_size, hidden]}, row (offset + k * B + b)
        # % ring_size for step k, batch row b; the offset advances by steps * B per replay.
        self.feature_ring: dict[int, torch.Tensor] = {}
        self.ring_size = 0
        self.ring_written = 0  # the host's copy of the device write offset
        if self.capture_layers:
            cfg = decoder.config
            row_bytes = cfg.hidden_size * decoder.embed.weight.element_size() * len(self.capture_layers)
            self.ring_size = max(2 * block_size * self.max_batch, FEATURE_RING_BYTES // row_bytes)
            self.feature_ring = {key: torch.zeros(self.ring_size, cfg.hidden_size, dtype=decoder.embed.weight.dtype,
                                                  device=self.device) for key in self.capture_layers}
            self.ring_offset = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.ring_arange = torch.arange(block_size * self.max_batch, device=self.device)

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket holding `n` sequences, None when none does (the step runs eagerly)."""
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _views(self, B: int) -> tuple[torch.Tensor, ...]:
        s = self.staging
        ids, pos, lens, temps = (s[i * B:(i + 1) * B] for i in range(4))
        tables = s[4 * B + 1:4 * B + 1 + B * self.width].view(B, self.width)
        return ids, pos, lens, temps.view(torch.float64), s[4 * B:4 * B + 1], tables

    def _size(self, B: int) -> int:
        return B * (4 + self.width) + 1

    def _forward(self, B: int, steps: int = 1
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor | None]:
        """`steps` > 1: that many decode steps, each feeding its draws to the next on the device
        (positions, lengths and slots advance by one; the block tables must already hold the
        blocks); returns the last step's logits, the captured hidden states of every step
        ({layer: [steps, B, hidden]}) and the draws of all steps [steps, 2, B]."""
        ids0, pos0, lens0, temps, seed, tables = self._views(B)
        tables32 = tables.to(torch.int32)
        sampled = torch.empty(steps, 2, B, dtype=torch.float64, device=self.device)
        tokens = ids0
        per_step = []
        for k in range(steps):
            ids, pos, lens, slots = decode_inputs(tokens, pos0, lens0, tables, k, self.block_size)
            attn = AttentionMetadata(self.cu_seqlens[:B + 1], lens, tables32, slots,
                                     max_q_len=1, skip_scale=self.skip_scale,
                                     counters=self.counters if self.skip_scale > 0 else None)
            if self.capture_layers:
                hidden, captured = self.decoder(ids, pos, attn, self.kv_caches, capture_layers=self.capture_layers)
            else:
                hidden, captured = self.decoder(ids, pos, attn, self.kv_caches), {}
            logits = self.decoder.compute_logits(hidden)
            if not self.capture_enabled and steps == 1:
                return logits, captured, None  # the caller samples (the CPU engine's torch sampler)
            self._draw(logits, temps, seed, k, sampled[k])
            tokens = sampled[k, 0]
            per_step.append(captured)
        if steps == 1:
            return logits, captured, sampled[0]
        advance_replay_inputs(ids0, pos0, lens0, seed, tokens, steps)  # a chained replay's inputs
        if captured:  # into the ring, at the device's offset (a chained replay's inputs are not uploaded)
            rows = (self.ring_offset + self.ring_arange[:steps * B]) % self.ring_size
            for key in captured:
                self.feature_ring[key].index_copy_(0, rows, torch.cat([c[key] for c in per_step]))
            self.ring_offset.add_(steps * B)
        return logits, {}, sampled

    def _draw(self, logits: torch.Tensor, temps: torch.Tensor, seed: torch.Tensor, step: int,
              out: torch.Tensor) -> None:
        """Step `step`'s tokens and log-probs into out [2, B], seeded by seed + step."""
        if self.capture_enabled:
            from slipstream.kernels.sampling import fused_sample

            fused_sample(logits, temps, seed, seed_offset=step, out=out)
            return
        # the eager static path on CPU (tests): the torch sampler, seeded from the same seed
        from slipstream.rollout.sampler import sample

        gen = torch.Generator(logits.device).manual_seed(int(seed) + step)
        tokens, logprobs = sample(logits, temps.float(), None, None, gen, truncate=False)
        out.copy_(torch.stack([tokens.double(), logprobs.double()]))

    def _fill(self, seqs: Seq[Sequence], B: int, seed: int = 0) -> None:
        """Write the step's inputs for `seqs` (padded to B rows) into the pinned host buffer."""
        h, W = self.host_np, self.width
        n = len(seqs)
        t0 = 4 * B + 1
        last = [seq.num_tokens - 1 for seq in seqs]  # the last token is fed back; its K/V goes there
        h[:n] = [seq.last_token for seq in seqs]
        h[B:B + n] = last
        h[2 * B:2 * B + n] = [p + 1 for p in last]
        self.host_f64[3 * B:3 * B + n] = [seq.params.temperature for seq in seqs]
        self._write_tables(h[t0:t0 + B * W], seqs)
        h[n:B] = 0
        h[B + n:2 * B] = 0
        h[2 * B + n:3 * B] = 1
        self.host_f64[3 * B + n:4 * B] = 0.0
        h[4 * B] = seed

    def _write_tables(self, h: np.ndarray, seqs: Seq[Sequence]) -> None:
        """The block tables of `seqs` into h [B * width], rows past them padding rows (position 0
        in the scratch block); no stale entry past a table's end (the CPU attention gathers up to
        the longest table)."""
        W = self.width
        h[:] = 0
        for i, seq in enumerate(seqs):
            h[i * W:i * W + len(seq.block_table)] = seq.block_table
        h[len(seqs) * W::W] = self.scratch_block

    def _capture(self, B: int, steps: int = 1) -> None:
        count_capture()
        self.host_np[:] = 0
        self._fill([], B)
        self.staging.copy_(self.host)
        if not self.capture_enabled:
            self.graphs[B, steps] = (None, None, {}, None)
            return
        graph, (logits, captured, sampled) = capture_graph(lambda: self._forward(B, steps), self.device,
                                                           self.pool)
        self.pool = graph.pool()
        self.graphs[B, steps] = (graph, logits, captured, sampled)
        if self.capture_layers and steps > 1:
            self.ring_offset.fill_(self.ring_written)  # the warm-up run before the capture moved it

    def capture_all(self, steps: int) -> None:
        """Every bucket's graph of `steps` decode steps (1: the single-step one)."""
        for B in self.buckets:
            if (B, steps) not in self.graphs:
                self._capture(B, steps)

    def replay(self, seqs: Seq[Sequence], seed: int = 0
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor | None]:
        """One decode step of `seqs`: logits [n, vocab], captured hidden states, and (GPU) the fused
        sampler's draw at each row's temperature, seeded by `seed`: float64 [2, n] (tokens; log-probs)."""
        n = len(seqs)
        B = self._prepare(seqs, seed)
        graph, logits, captured, sampled = self.graphs[B, 1]
        if graph is None:
            logits, captured, sampled = self._forward(B)
        else:
            graph.replay()
        return logits[:n], {k: v[:n] for k, v in captured.items()}, None if sampled is None else sampled[:, :n]

    def replay_steps(self, seqs: Seq[Sequence], steps: int, seed: int = 0, chained: bool = False
                     ) -> tuple[torch.Tensor, int]:
        """`steps` decode steps of `seqs` in one replay: the graph's static draws, float64
        [steps, 2, bucket] (tokens; log-probs), of which the first len(seqs) columns are `seqs`',
        and, with feature capture, where the replay's rows start in the feature ring (see
        `ring_rows`; 0 without capture).

        Every sequence's block table must already cover its next `steps` tokens, and `steps` must
        not exceed the block size (padding rows stay in the scratch block). `chained`: continue
        the previous replay of the same `seqs` and `steps` from where it ended, before the host
        has read its draws: the graph left its last draws, positions, lengths and seed as the
        next inputs; only the block tables are uploaded again, where one grew (`seed` unused).
        """
        if not 1 < steps <= self.block_size:
            raise ValueError(f"steps must be in 2..{self.block_size} (the block size), got {steps}")
        if chained:
            B = self.last_bucket
            if self.bucket_for(len(seqs)) != B or (B, steps) not in self.graphs:
                raise ValueError("a chained replay continues the previous replay of the same sequences and steps")
            self._upload_grown_tables(seqs, B)
        else:
            B = self._prepare(seqs, seed, steps)
        graph, _, _, sampled = self.graphs[B, steps]
        start = self.ring_written
        if self.capture_layers:
            self.ring_written += steps * B
        if graph is None:
            _, _, sampled = self._forward(B, steps)
        else:
            graph.replay()
        return sampled, start

    def ring_rows(self, start: int, steps: np.ndarray, columns: np.ndarray, bucket: int) -> np.ndarray:
        """Feature-ring rows of (step, batch column) pairs of the replay of `bucket` whose rows
        start at `start`."""
        return (start + steps * bucket + columns) % self.ring_size

    def _upload_grown_tables(self, seqs: Seq[Sequence], B: int) -> None:
        """Copy the block tables of `seqs` to the device if one grew since the last upload, from
        the other of two pinned buffers (an earlier copy from this one may still be queued)."""
        lengths = [len(seq.block_table) for seq in seqs]
        if lengths == self.table_lengths:
            return
        self.table_lengths = lengths
        self.table_flip ^= 1
        host, W = self.table_hosts[self.table_flip], self.width
        self._write_tables(host.numpy()[:B * W], seqs)
        *_, tables = self._views(B)
        tables.view(-1).copy_(host[:B * W], non_blocking=True)

    def _prepare(self, seqs: Seq[Sequence], seed: int, steps: int = 1) -> int:
        """Capture the bucket's graph if needed and move the step's inputs in; returns the bucket."""
        n = len(seqs)
        B = self.bucket_for(n)
        if B is None or n == 0:
            raise ValueError(f"decode graphs hold 1..{self.max_batch} sequences, got {n}")
        if (B, steps) not in self.graphs:
            self._capture(B, steps)
        self._fill(seqs, B, seed)
        self.table_lengths = [len(seq.block_table) for seq in seqs]
        size = self._size(B)
        self.staging[:size].copy_(self.host[:size], non_blocking=True)
        self.last_bucket = B
        return B

    def last_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) of the first `n` rows of the last replay (views of the static buffers)."""
        ids, pos, *_ = self._views(self.last_bucket)
        return ids[:n], pos[:n]
