"""Runs a speculative step: one packed forward over every sequence's last token and draft, then
lossless verification of the drafts against the target's logits at every drafted position.

A sampling entry with a draft of k tokens owns the last k + 1 rows of its query: row j gives the
target distribution of the token after draft j - 1 (row 0: after the last sampled token). Entries
without a draft (a prefill that ends this step, or a decode with nothing to propose) are verified
with k = 0, which draws one token from the same distribution `sample` would and reports the same
log-probability. Like the plain step, the only host synchronisation is one read of the results.

Captured hidden states (for a learned drafter) are handed to the feature sink after the step is
postprocessed (`emit_features`), and only for positions the sequences kept: a rejected draft, or
a draft token after a stop, never reaches the consumer, exactly as in plain decoding.
"""

from __future__ import annotations

import torch

from slipstream.kernels.attention import MAX_DECODE_Q_LEN
from slipstream.models.decoder import AttentionMetadata
from slipstream.rollout.model_runner import ModelRunner, StepFeatures
from slipstream.rollout.scheduler import ScheduledBatch
from slipstream.rollout.spec.verify import verify_drafts


class SpecRunner:
    """Verification steps on the model runner's decoder, cache and generator."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._features: tuple | None = None  # (batch, inputs, captured) until `emit_features`

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[list[int]], list[list[float]]]:
        """The emitted tokens (accepted drafts, then the replacement or bonus token) and their
        target log-probabilities, per sampling entry of `batch`, for `postprocess_verified`."""
        r = self.runner
        device = r.device
        inputs = batch.build_inputs(device)
        phase = "decode" if inputs.max_q_len <= MAX_DECODE_Q_LEN else "prefill"
        skip = r.decode_skip_scale if phase == "decode" else r.prefill_skip_scale
        attn = AttentionMetadata(inputs.cu_seqlens_q, inputs.seq_lens, inputs.block_tables, inputs.slot_mapping,
                                 inputs.max_q_len, skip_scale=skip,
                                 counters=r.tile_counters[phase] if skip > 0 else None)
        captured = None
        if r.capture_layers:
            hidden, captured = r.decoder(inputs.input_ids, inputs.positions, attn, r.kv_caches,
                                         capture_layers=r.capture_layers)
        else:
            hidden = r.decoder(inputs.input_ids, inputs.positions, attn, r.kv_caches)

        # Rows of each sampling entry's verified positions, padded by repeating its last row
        # (verification never reads a position past the entry's draft).
        sampling = batch.sampling
        K = max(len(e.draft) for e in sampling)
        rows, drafts, offset = [], [], 0
        for e in batch.entries:
            end = offset + e.num_new
            if e.samples:
                k = len(e.draft)
                rows.append([end - 1 - k + min(j, k) for j in range(K + 1)])
                drafts.append(list(e.draft) + [0] * (K - k))
            offset = end
        row_index = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        draft_tokens = torch.tensor(drafts, dtype=torch.long).reshape(len(sampling), K).to(device, non_blocking=True)
        draft_lens = torch.tensor([len(e.draft) for e in sampling], dtype=torch.long).to(device, non_blocking=True)
        logits = self.runner.decoder.compute_logits(hidden[row_index.reshape(-1)]).view(len(sampling), K + 1, -1)

        params = [e.seq.params for e in sampling]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        truncate = any(p.top_p < 1.0 or p.top_k > 0 for p in params)
        result = verify_drafts(logits, draft_tokens, draft_lens, temperature, top_p, top_k,
                               generator=r.generator, truncate=truncate)
        # One host read: token ids are exact in float32 below 2**24.
        packed = torch.cat([result.accepted_lens[:, None].float(), result.output_tokens.float(),
                            result.output_logprobs.float()], dim=1).tolist()
        emitted, logprobs = [], []
        for row in packed:
            n = int(row[0]) + 1
            emitted.append([int(t) for t in row[1:1 + n]])
            logprobs.append(row[2 + K:2 + K + n])
        if captured is not None:
            self._features = (batch, inputs, captured)
        return emitted, logprobs

    @torch.inference_mode()
    def emit_features(self, batch: ScheduledBatch) -> None:
        """After `postprocess_verified(batch, ...)`: hand the feature sink the hidden states of
        the positions each sequence kept, i.e. every fed token that is not its last one (the last
        is fed by the next step, or is a stop token that never is)."""
        if self._features is None:
            return
        fed, inputs, captured = self._features
        self._features = None
        if fed is not batch:
            raise RuntimeError("emit_features for another batch than the last one run")
        r = self.runner
        keep, offset = [], 0
        for e in batch.entries:
            n = min(e.num_new, e.seq.num_tokens - 1 - e.start)
            keep.extend(range(offset, offset + n))
            offset += e.num_new
        index = torch.tensor(keep, dtype=torch.long).to(r.device, non_blocking=True)
        owner = torch.searchsorted(inputs.cu_seqlens_q[1:].long(), index, right=True)
        r.feature_sink(StepFeatures([(e.seq.request_id, e.seq.sample_index) for e in batch.entries], owner,
                                    inputs.positions[index], inputs.input_ids[index],
                                    {key: h[index] for key, h in captured.items()}))
