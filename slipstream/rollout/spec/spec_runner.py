"""Runs a speculative step: one packed forward over every sequence's last token and draft, then
lossless verification of the drafts against the target's logits at every drafted position.

A sampling entry with a draft of k tokens owns the last k + 1 rows of its query: row j gives the
target distribution of the token after draft j - 1 (row 0: after the last sampled token). Entries
without a draft (a prefill that ends this step, or a decode with nothing to propose) are verified
with k = 0, which draws one token from the same distribution `sample` would and reports the same
log-probability. Like the plain step, the only host synchronisation is one read of the results.

Captured hidden states (for a learned drafter) are handed to the feature sink after the step is
postprocessed (`emit_features`), and only for positions the sequences kept: a rejected draft, or
a draft token after a stop, never reaches the consumer, exactly as in plain decoding. Capturing
steps replay the verification graphs too (the graphs then also output the captured layers).
"""

from __future__ import annotations

import itertools

import torch

from slipstream.rollout.model_runner import ModelRunner, StepFeatures
from slipstream.rollout.scheduler import ScheduledBatch
from slipstream.rollout.spec.verify import verify_drafts
from slipstream.rollout.spec.verify_graphs import VerifyGraphs


class SpecRunner:
    """Verification steps on the model runner's decoder, cache and generator.

    Steps of decoding sequences only (no prefill chunk), within `max_graph_batch` sequences,
    replay verification graphs (`verify_graphs.py`) where the runner replays decode graphs;
    other steps run eagerly.
    """

    def __init__(self, runner: ModelRunner, max_graph_batch: int = 32):
        self.runner = runner
        self.max_graph_batch = max_graph_batch
        self.graphs: VerifyGraphs | None = None
        self._static = False
        # (batch, first row of each entry, input ids, positions, captured) until `emit_features`
        self._features: tuple | None = None

    def use_static_verify(self) -> None:
        """Run verification through the graphs' padded static buffers without capturing them: the
        CPU tests check the padding and the buffer layout this way."""
        self._static = True

    def capture_all(self) -> None:
        """Every verification graph, where verification replays graphs."""
        graphs = self._verify_graphs()
        if graphs is not None:
            graphs.capture_all()

    def release_graphs(self) -> None:
        """Drop the verification graphs (and with them the last references to a released cache)."""
        self.graphs = None

    def _verify_graphs(self) -> VerifyGraphs | None:
        r = self.runner
        if not (r.use_graphs or self._static) or not r.kv_caches:
            return None
        if self.graphs is None or self.graphs.kv_caches is not r.kv_caches:  # a new cache: new graphs
            self.graphs = VerifyGraphs(r.decoder, r.kv_caches, r.block_size, r.max_model_len,
                                       scratch_block=r.num_blocks, max_batch=self.max_graph_batch,
                                       capture=r.use_graphs, skip_scale=r.decode_skip_scale,
                                       counters=r.tile_counters["decode"], capture_layers=r.capture_layers)
        return self.graphs

    def _graph_logits(self, batch: ScheduledBatch, K: int) -> torch.Tensor | None:
        """Target logits [S, K + 1, V] from a verification graph, None if the step runs eagerly."""
        entries = batch.entries
        if any(not e.samples or e.num_new != 1 + len(e.draft) for e in entries):
            return None
        graphs = self._verify_graphs()
        shape = graphs.shape_for(len(entries), K) if graphs is not None else None
        if shape is None:
            return None
        logits = graphs.replay(entries, *shape)[:len(entries), :K + 1]
        if self.runner.capture_layers:
            Q = shape[1]
            ids, positions = graphs.last_inputs()
            self._features = (batch, [i * Q for i in range(len(entries))], ids, positions, graphs.captured)
        return logits

    def _eager_logits(self, batch: ScheduledBatch, K: int) -> torch.Tensor:
        """Target logits [S, K + 1, V] from a packed eager forward (rows past an entry's draft
        repeat its last row: verification never reads them)."""
        r = self.runner
        inputs = batch.build_inputs(r.device)
        attn = r.eager_attention(inputs)
        if r.capture_layers:
            hidden, captured = r.decoder(inputs.input_ids, inputs.positions, attn, r.kv_caches,
                                         capture_layers=r.capture_layers)
            firsts = list(itertools.accumulate((e.num_new for e in batch.entries[:-1]), initial=0))
            self._features = (batch, firsts, inputs.input_ids, inputs.positions, captured)
        else:
            hidden = r.decoder(inputs.input_ids, inputs.positions, attn, r.kv_caches)
        rows, offset = [], 0
        for e in batch.entries:
            end = offset + e.num_new
            if e.samples:
                k = len(e.draft)
                rows.append([end - 1 - k + min(j, k) for j in range(K + 1)])
            offset = end
        row_index = torch.tensor(rows, dtype=torch.long).to(r.device, non_blocking=True)
        return r.decoder.compute_logits(hidden[row_index.reshape(-1)]).view(len(rows), K + 1, -1)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, draft_probs: torch.Tensor | None = None
            ) -> tuple[list[list[int]], list[list[float]]]:
        """The emitted tokens (accepted drafts, then the replacement or bonus token) and their
        target log-probabilities, per sampling entry of `batch`, for `postprocess_verified`.
        draft_probs [sampling entries, K, V]: the distributions a drafter drew the drafts from
        (None: deterministic drafts)."""
        r = self.runner
        r.flush_features()  # the sink sees every sequence's rows in the order of its positions
        device = r.device
        sampling = batch.sampling
        K = max(len(e.draft) for e in sampling)
        logits = self._graph_logits(batch, K)
        if logits is None:
            logits = self._eager_logits(batch, K)
        drafts = [list(e.draft) + [0] * (K - len(e.draft)) for e in sampling]
        draft_tokens = torch.tensor(drafts, dtype=torch.long).reshape(len(sampling), K).to(device, non_blocking=True)
        draft_lens = torch.tensor([len(e.draft) for e in sampling], dtype=torch.long).to(device, non_blocking=True)

        params = [e.seq.params for e in sampling]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device, non_blocking=True)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device, non_blocking=True)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long).to(device, non_blocking=True)
        truncate = any(p.truncates for p in params)
        result = verify_drafts(logits, draft_tokens, draft_lens, temperature, top_p, top_k,
                               draft_probs=draft_probs, generator=r.generator, truncate=truncate)
        # One host read: token ids are exact in float32 below 2**24.
        packed = torch.cat([result.accepted_lens[:, None].float(), result.output_tokens.float(),
                            result.output_logprobs.float()], dim=1).tolist()
        emitted, logprobs = [], []
        for row in packed:
            n = int(row[0]) + 1
            emitted.append([int(t) for t in row[1:1 + n]])
            logprobs.append(row[2 + K:2 + K + n])
        return emitted, logprobs

    @torch.inference_mode()
    def emit_features(self, batch: ScheduledBatch) -> None:
        """After `postprocess_verified(batch, ...)`: hand the feature sink the hidden states of
        the positions each sequence kept, i.e. every fed token that is not its last one (the last
        is fed by the next step, or is a stop token that never is)."""
        if self._features is None:
            return
        fed, firsts, input_ids, positions, captured = self._features
        self._features = None
        if fed is not batch:
            raise RuntimeError("emit_features for another batch than the last one run")
        r = self.runner
        keep, owners = [], []
        for i, (e, first) in enumerate(zip(batch.entries, firsts)):
            n = min(e.num_new, e.seq.num_tokens - 1 - e.start)
            keep.extend(range(first, first + n))
            owners.extend([i] * n)
        both = torch.tensor([keep, owners], dtype=torch.long).reshape(2, len(keep)).to(r.device, non_blocking=True)
        index, owner = both[0], both[1]
        r.feature_sink(StepFeatures([(e.seq.request_id, e.seq.sample_index) for e in batch.entries], owner,
                                    positions[index], input_ids[index],
                                    {key: h[index] for key, h in captured.items()}))
