"""A toy target whose next-token distribution is a fixed function of the current token.

The decoder is a real `slipstream.models.decoder.Decoder` whose layer adds nothing to the
residual stream (o_proj and down_proj are zero), so its feature at position t is embed(x_t).
Embeddings are orthogonal with unit RMS; the LM head puts logit SHARPNESS on the two successors
(3a + 1) % V and (5a + 2) % V of token a and 0 elsewhere, so x_{t+1} is one of two tokens, each
with probability ~1/2. Because the successor is random, only a drafter that sees the token
actually emitted after h_t (EAGLE's pairing) can predict h_{t+1} exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slipstream.models.decoder import Decoder, DecoderConfig
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.types import Request, SamplingParams

VOCAB = 16
HIDDEN = 32
SHARPNESS = 12.0


def successors(a: int) -> tuple[int, int]:
    return (3 * a + 1) % VOCAB, (5 * a + 2) % VOCAB


def toy_decoder() -> Decoder:
    config = DecoderConfig(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1, num_heads=2,
                           num_kv_heads=2, head_dim=HIDDEN // 2, intermediate_size=HIDDEN, rms_norm_eps=1e-6)
    decoder = Decoder(config)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g))
    embed = basis[:VOCAB] * HIDDEN**0.5  # orthogonal rows, RMS 1
    head = torch.zeros(VOCAB, HIDDEN)
    for a in range(VOCAB):
        for s in successors(a):
            head[s] += embed[a] * (SHARPNESS / HIDDEN)
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.embed.weight.copy_(embed)
        decoder.norm.weight.fill_(1.0)
        decoder.layers[0].input_norm.weight.fill_(1.0)
        decoder.layers[0].post_attention_norm.weight.fill_(1.0)
        decoder.lm_head.weight.copy_(head)
    return decoder


def toy_engine(decoder: Decoder, sink) -> Engine:
    return Engine(decoder, eos_token_ids=[], cfg=EngineConfig(block_size=4, num_blocks=512, max_model_len=256),
                  capture_layers=(-1,), feature_sink=sink)


def toy_requests(num_prompts: int, samples: int, max_tokens: int, seed: int, temperature: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed)
    return [Request(torch.randint(VOCAB, (3,), generator=g).tolist(), params, f"g{i}", f"r{seed}-{i}")
            for i in range(num_prompts)]


@pytest.fixture
def toy():
    """The toy target's pieces: decoder(), engine(decoder, sink), requests(...), successors(a), sizes."""
    return SimpleNamespace(decoder=toy_decoder, engine=toy_engine, requests=toy_requests, successors=successors,
                           vocab=VOCAB, hidden=HIDDEN)


@pytest.fixture(autouse=True)
def _one_thread():
    """The drafter tests' tensors are tiny: one intra-op thread is faster than several, and far
    faster when the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
