"""Runs one scheduled step on the decoder: packed forward over the paged cache, then sampling.

Decode-only steps replay a CUDA graph (cuda_graph.py) on GPU; other steps run eagerly. The only
host synchronisation of a step is reading the sampled tokens and their log-probs back, together.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slipstream.kernels.attention import MAX_DECODE_Q_LEN
from slipstream.models.decoder import AttentionMetadata, Decoder
from slipstream.rollout.cuda_graph import DecodeGraphs
from slipstream.rollout.sampler import sample
from slipstream.rollout.scheduler import ModelInputs, ScheduledBatch


@dataclass
class StepFeatures:
    """Hidden states of the tokens one step computed, for a consumer such as a drafter.

    Row r of every tensor is packed token r: `token_ids[r]` at `positions[r]` of sequence
    `seq_keys[owner[r]]` = (request_id, sample_index). `hidden[layer]` is [T, hidden_size] (the
    decoder's capture convention: index i is the residual stream after layer i, -1 the last layer).
    Prompt tokens appear in prefill steps; a generated token appears in the step that feeds it back.
    """

    seq_keys: list[tuple[str, int]]
    owner: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    token_ids: torch.Tensor  # [T] long
    hidden: dict[int, torch.Tensor]


@dataclass
class LaunchedSteps:
    """Decode steps launched and not yet read: their draws [steps, 2, bucket] land in `draws` (a
    host buffer) once the event `done` (None on CPU: already there) has passed."""

    draws: torch.Tensor
    done: torch.cuda.Event | None
    num_seqs: int
    bucket: int
    ring_start: int  # feature capture: where the replay's rows start in the graphs' feature ring


class ModelRunner:
    def __init__(self, decoder: Decoder, num_blocks: int, block_size: int, seed: int = 0,
                 capture_layers: tuple[int, ...] = (), feature_sink: Callable[[StepFeatures], None] | None = None,
                 prefill_skip_scale: float = 0.0, decode_skip_scale: float = 0.0, cuda_graphs: bool = True,
                 max_model_len: int = 4096, max_graph_batch: int = 256):
        """`cuda_graphs`: replay decode steps of up to `max_graph_batch` sequences from CUDA graphs (GPU only)."""
        self.decoder = decoder
        self.prefill_skip_scale, self.decode_skip_scale = prefill_skip_scale, decode_skip_scale
        # (skipped, visited) key tiles per phase, summed on the device; read only when asked.
        self.tile_counters = {phase: torch.zeros(2, dtype=torch.int64, device=decoder.embed.weight.device)
                              for phase in ("prefill", "decode")}
        # Capture costs nothing unless a consumer asked for it.
        self.capture_layers = tuple(capture_layers) if feature_sink is not None else ()
        self.feature_sink = feature_sink
        self.device = decoder.embed.weight.device
        self.block_size, self.num_blocks = block_size, num_blocks
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.max_model_len, self.max_graph_batch = max_model_len, max_graph_batch
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: DecodeGraphs | None = None
        self.allocate_cache()
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.seeds = random.Random(seed)  # seeds of the fused sampling kernel
        self.draw_hosts: list[torch.Tensor] | None = None  # pinned buffers of launched decode steps' draws
        self.draw_flip = 0
        # several-step replays' feature rows not handed to the sink yet
        self._queued_steps: list[tuple] = []  # launches' rows queued by emit_step_features, not yet indexed
        self._pending_features: list[tuple[list, np.ndarray]] = []  # and indexed: (owner keys, row grid)
        self._pending_start = 0  # ring offset of the oldest pending replay's rows

    def allocate_cache(self) -> None:
        """Allocate the KV cache, if released: the block manager's blocks plus one scratch block that
        padded decode rows write to, and the decode graphs over it."""
        if not self.kv_caches:
            self.kv_caches = self.decoder.allocate_kv_cache(self.num_blocks + 1, self.block_size)
            self.graphs = self._decode_graphs(capture=True) if self.use_graphs else None

    def use_static_decode(self) -> None:
        """Run decode steps through the graphs' padded static buffers, without capturing: the CPU
        tests check the padding, the scratch block and the buffer layout this way."""
        self.graphs = self._decode_graphs(capture=False)

    def _decode_graphs(self, capture: bool) -> DecodeGraphs:
        return DecodeGraphs(self.decoder, self.kv_caches, self.block_size, self.max_model_len,
                            scratch_block=self.num_blocks, max_batch=self.max_graph_batch, capture=capture,
                            skip_scale=self.decode_skip_scale, counters=self.tile_counters["decode"],
                            capture_layers=self.capture_layers)

    def release_cache(self) -> None:
        """Free the KV cache and the graphs that point into it."""
        self.flush_features()
        self.graphs = None
        self.kv_caches = []

    def sparsity(self, reset: bool = True) -> dict[str, float]:
        """Measured fraction of key tiles skipped per phase since the last reset (phases that ran)."""
        out = {}
        for phase, c in self.tile_counters.items():
            skipped, visited = c.tolist()
            if visited:
                out[phase] = skipped / visited
            if reset:
                c.zero_()
        return out

    @property
    def can_decode_steps(self) -> bool:
        """Whether several decode steps per replay are available (decode graphs)."""
        return self.graphs is not None

    @torch.inference_mode()
    def launch_decode_steps(self, seqs: list, steps: int, chained: bool = False) -> "LaunchedSteps":
        """`steps` decode steps of `seqs` in one graph replay, launched without waiting for it;
        `finish_decode_steps` reads the draws. Their block tables must cover the `steps` new tokens.
        `chained`: continue the replay launched just before, of the same `seqs` and `steps`, whose
        draws the host has not read yet (`DecodeGraphs.replay_steps`)."""
        graphs = self.graphs
        if self.pending_feature_rows + steps * graphs.bucket_for(len(seqs)) > graphs.ring_size:
            self.flush_features()  # this replay would overwrite pending rows: gather them first
        sampled, ring_start = graphs.replay_steps(seqs, steps, 0 if chained else self.seeds.getrandbits(31),
                                                  chained=chained)
        bucket = graphs.last_bucket
        if self.device.type != "cuda":
            self._index_queued_steps()
            return LaunchedSteps(sampled.clone(), None, len(seqs), bucket, ring_start)
        if self.draw_hosts is None:  # two, alternating: a launch may start while the previous one's copy is queued
            size = self.block_size * 2 * self.graphs.max_batch
            self.draw_hosts = [torch.empty(size, dtype=torch.float64, pin_memory=True) for _ in range(2)]
        self.draw_flip ^= 1
        host = self.draw_hosts[self.draw_flip][:sampled.numel()].view(sampled.shape)
        host.copy_(sampled, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._index_queued_steps()  # host work while the GPU runs the replay
        return LaunchedSteps(host, done, len(seqs), bucket, ring_start)

    def finish_decode_steps(self, launched: "LaunchedSteps") -> tuple[list[list[int]], list[list[float]]]:
        """Wait for a launch's draws: tokens[k][i] and logprobs[k][i] of step k for its seqs[i]."""
        if launched.done is not None:
            launched.done.synchronize()  # the step's one host synchronisation
        draws = launched.draws[:, :, :launched.num_seqs]
        return draws[:, 0].long().tolist(), draws[:, 1].tolist()

    def emit_step_features(self, launched: "LaunchedSteps", seqs: list, columns: list[int],
                           first: list[tuple[int, int]], tokens: list[list[int]], taken: list[int]) -> None:
        """Queue for the feature sink the rows of a launch's steps: seqs[j] (column columns[j] of
        the launch) fed first[j] = (token, position) at step 0 and its draw of step k - 1 at step
        k, and is in the steps before its `taken[j]` draws ended. The rows stay in the graphs'
        feature ring until `flush_features` (called where the rows are read: before a learned
        draft, a prefill or verification step and at the rollout's end; a replay that would
        overwrite queued rows calls it first). Their ids are worked out later, after the next
        launch (while the GPU runs it) or in `flush_features`: here the host only queues them,
        as it may be all that stands between two replays."""
        if not (self._queued_steps or self._pending_features):
            self._pending_start = launched.ring_start
        self._queued_steps.append((launched.ring_start, launched.bucket, seqs, columns, first, tokens, taken))

    def _index_queued_steps(self) -> None:
        """The queued launches' rows: owner, position, token fed and ring row of each."""
        # A few numpy ops rather than loops over rows: the host's time per replay grows with the batch.
        queued, self._queued_steps = self._queued_steps, []
        for ring_start, bucket, seqs, columns, first, tokens, taken in queued:
            K, n = len(tokens), len(seqs)
            taken_a = np.asarray(taken, dtype=np.int64)
            rows_in = np.arange(K)[:, None] < taken_a[None]  # [K, n]: seq j is in step k
            if not K or not rows_in.any():
                continue
            keys = [(seq.request_id, seq.sample_index) for seq, t in zip(seqs, taken) if t > 0]
            first_a = np.asarray(first, dtype=np.int64).reshape(n, 2)
            grid = np.empty((4, K, n), dtype=np.int64)
            grid[0] = np.cumsum(taken_a > 0) - 1  # owner: index into `keys`
            grid[1] = first_a[:, 1] + np.arange(K)[:, None]  # position
            grid[2, 0] = first_a[:, 0]  # the token fed at step k: the first, then step k - 1's draw
            grid[2, 1:] = np.asarray(tokens[:-1], dtype=np.int64).reshape(K - 1, n)
            grid[3] = self.graphs.ring_rows(ring_start, np.arange(K)[:, None],
                                            np.asarray(columns, dtype=np.int64)[None], bucket)
            self._pending_features.append((keys, grid[:, rows_in]))

    @torch.inference_mode()  # as `run`: a sink's tensors made in one must be writable in the other
    def flush_features(self) -> None:
        """Hand the feature sink the queued rows of several-step replays, in one StepFeatures
        (each sequence's rows in the order of its positions). The rows' ids, positions and owners
        go to the device in one asynchronous copy from page-locked memory."""
        self._index_queued_steps()
        if not self._pending_features:
            return
        pending, self._pending_features = self._pending_features, []
        index, grids = {}, []
        for replay_keys, grid in pending:  # one owner numbering over all the replays
            ids = np.asarray([index.setdefault(k, len(index)) for k in replay_keys], dtype=np.int64)
            grids.append(np.concatenate([ids[grid[0]][None], grid[1:]]))
        keys = list(index)
        host = torch.from_numpy(np.concatenate(grids, axis=1))
        if self.device.type == "cuda":
            host = host.pin_memory()
        rows = host.to(self.device, non_blocking=True)
        self.feature_sink(StepFeatures(keys, rows[0], rows[1], rows[2],
                                       {key: ring.index_select(0, rows[3])
                                        for key, ring in self.graphs.feature_ring.items()}))

    @property
    def pending_feature_rows(self) -> int:
        """Rows queued by `emit_step_features` and not yet handed to the sink."""
        return self.graphs.ring_written - self._pending_start if self._queued_steps or self._pending_features else 0

    def drop_features(self) -> None:
        """Forget the queued rows (after a failed step)."""
        self._queued_steps, self._pending_features = [], []

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.seeds.seed(seed)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[float]]:
        self.flush_features()  # the sink sees every sequence's rows in the order of its positions
        entries = batch.entries
        if (self.graphs is not None and entries and len(entries) <= self.graphs.max_batch
                and all(e.num_new == 1 and e.samples for e in entries)):
            logits, captured, sampled = self.graphs.replay([e.seq for e in entries], self.seeds.getrandbits(31))
            if self.capture_layers:
                ids, positions = self.graphs.last_inputs(len(entries))
                self.feature_sink(StepFeatures([(e.seq.request_id, e.seq.sample_index) for e in entries],
                                               torch.arange(len(entries), device=self.device), positions, ids,
                                               {k: v.clone() for k, v in captured.items()}))
            if sampled is not None and not any(e.seq.params.truncates for e in entries):
                tokens, logprobs = sampled.cpu().tolist()  # the step's one host synchronisation
                return [int(t) for t in tokens], logprobs
            return self._sample(logits, entries)
        return self._run_eager(batch)

    def eager_attention(self, inputs: ModelInputs) -> AttentionMetadata:
        """Attention metadata of an eager forward over `inputs` (`ScheduledBatch.build_inputs`): the
        decode or prefill kernel by query length, with that phase's skip scale and tile counters."""
        phase = "decode" if inputs.max_q_len <= MAX_DECODE_Q_LEN else "prefill"
        skip = self.decode_skip_scale if phase == "decode" else self.prefill_skip_scale
        return AttentionMetadata(inputs.cu_seqlens_q, inputs.seq_lens, inputs.block_tables, inputs.slot_mapping,
                                 inputs.max_q_len, skip_scale=skip,
                                 counters=self.tile_counters[phase] if skip > 0 else None)

    def _run_eager(self, batch: ScheduledBatch) -> tuple[list[int], list[float]]:
        inputs = batch.build_inputs(self.device)
        attn = self.eager_attention(inputs)
        if self.capture_layers:
            hidden, captured = self.decoder(inputs.input_ids, inputs.positions, attn, self.kv_caches,
                                            capture_layers=self.capture_layers)
            owner = torch.searchsorted(inputs.cu_seqlens_q[1:].long(),
                                       torch.arange(inputs.input_ids.shape[0], device=self.device), right=True)
            self.feature_sink(StepFeatures([(e.seq.request_id, e.seq.sample_index) for e in batch.entries], owner,
                                           inputs.positions, inputs.input_ids, captured))
        else:
            hidden = self.decoder(inputs.input_ids, inputs.positions, attn, self.kv_caches)
        sampling = batch.sampling
        if not sampling:  # a step of prefill chunks only
            return [], []
        return self._sample(self.decoder.compute_logits(hidden[inputs.sample_indices]), sampling)

    def _sample(self, logits: torch.Tensor, sampling: list) -> tuple[list[int], list[float]]:
        params = [e.seq.params for e in sampling]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(self.device,
                                                                                              non_blocking=True)
        truncate = any(p.truncates for p in params)
        if truncate:
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(self.device, non_blocking=True)
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.long).to(self.device, non_blocking=True)
        else:
            top_p = top_k = None
        tokens, logprobs = sample(logits, temperature, top_p, top_k, self.generator, truncate,
                                  seed=self.seeds.getrandbits(31))
        # The step's one host synchronisation: tokens and log-probs come back together.
        both = torch.stack([tokens.double(), logprobs.double()]).cpu()
        return both[0].long().tolist(), both[1].tolist()
