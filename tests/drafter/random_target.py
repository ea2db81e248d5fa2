"""A small target decoder with random embedding and LM head (unit final norm), for drafter tests
that need a target's head but not its layers."""

from __future__ import annotations

import torch

from slipstream.models.decoder import Decoder, DecoderConfig


def random_target(vocab: int, hidden: int, heads: int, kv_heads: int, head_dim: int = 8,
                  intermediate: int = 32) -> tuple[DecoderConfig, Decoder]:
    """(config, decoder) of a one-layer llama-shaped target; the same arguments give the same weights."""
    c = DecoderConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate)
    target = Decoder(c)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        target.embed.weight.copy_(torch.randn(vocab, hidden, generator=g))
        target.norm.weight.fill_(1.0)
        target.lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    return c, target
