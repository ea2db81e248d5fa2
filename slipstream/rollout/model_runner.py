"""Runs one scheduled step on the decoder: packed forward over the paged cache, then sampling.

The only host synchronisation of a step is reading the sampled tokens and their log-probs back.
"""

from __future__ import annotations

import torch

from slipstream.models.decoder import AttentionMetadata, Decoder
from slipstream.rollout.sampler import sample
from slipstream.rollout.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, decoder: Decoder, num_blocks: int, block_size: int, seed: int = 0):
        self.decoder = decoder
        self.device = decoder.embed.weight.device
        self.block_size = block_size
        self.kv_caches = decoder.allocate_kv_cache(num_blocks, block_size)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[float]]:
        inputs = batch.build_inputs(self.device)
        attn = AttentionMetadata(inputs.cu_seqlens_q, inputs.seq_lens, inputs.block_tables, inputs.slot_mapping,
                                 inputs.max_q_len)
        hidden = self.decoder(inputs.input_ids, inputs.positions, attn, self.kv_caches)
        sampling = batch.sampling
        if not sampling:  # a step of prefill chunks only
            return [], []
        logits = self.decoder.compute_logits(hidden[inputs.sample_indices])
        params = [e.seq.params for e in sampling]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=self.device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=self.device)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=self.device)
        tokens, logprobs = sample(logits, temperature, top_p, top_k, self.generator)
        return tokens.tolist(), logprobs.tolist()
