"""Teacher-forced decoder passes (prefill and extend steps) against the HF model, and the KL helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.teacher_forcing import next_token_kl, teacher_forced_steps


def _sequences(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (37, 150, 9)]


def _collect(steps, num_seqs: int) -> list[torch.Tensor]:
    """Each sequence's hidden rows in position order, checking the rows come in that order."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(num_seqs)]
    seen = [0] * num_seqs
    for step in steps:
        for s, p, h in zip(step.seq_index.tolist(), step.positions.tolist(), step.hidden):
            assert p == seen[s]
            seen[s] += 1
            rows[s].append(h)
    return [torch.stack(r) for r in rows]


@pytest.mark.parametrize("step_tokens", [None, 16, 5])
def test_prefill_and_extend_steps_match_hf(tiny_model, step_tokens):
    model, _ = tiny_model
    decoder = decoder_from_hf_module(model)
    seqs = _sequences(decoder.config.vocab_size)
    steps = list(teacher_forced_steps(decoder, seqs, step_tokens, block_size=16))
    assert len(steps) == (1 if step_tokens is None else -(-150 // step_tokens))
    for seq, hidden in zip(seqs, _collect(steps, len(seqs))):
        with torch.no_grad():
            want = model(torch.tensor([seq])).logits[0].float()
        torch.testing.assert_close(decoder.compute_logits(hidden), want, rtol=1e-4, atol=1e-4)


def test_skip_scale_counts_tiles_and_moves_the_distributions_a_little(tiny_model):
    model, _ = tiny_model
    decoder = decoder_from_hf_module(model)
    seqs = _sequences(decoder.config.vocab_size)
    for step_tokens in (None, 16):
        dense_counters, sparse_counters = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        kls = []
        for dense, sparse in zip(teacher_forced_steps(decoder, seqs, step_tokens, counters=dense_counters),
                                 teacher_forced_steps(decoder, seqs, step_tokens, skip_scale=1000.0,
                                                      counters=sparse_counters)):
            assert torch.equal(dense.positions, sparse.positions)
            kls.append(next_token_kl(decoder, dense.hidden, sparse.hidden, chunk_rows=7))
        kl = torch.cat(kls)
        assert dense_counters[0] == 0 and dense_counters[1] > 0
        assert sparse_counters[0] > 0, step_tokens  # some tiles were skipped
        assert kl.shape == (sum(map(len, seqs)),)
        assert (kl >= -1e-6).all() and 0 < kl.max() < 1.0


def test_next_token_kl_is_the_kl_of_the_logits(tiny_model):
    model, _ = tiny_model
    decoder = decoder_from_hf_module(model)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, decoder.config.hidden_size, generator=gen), torch.randn(10, decoder.config.hidden_size,
                                                                                   generator=gen)
    p, q = F.log_softmax(decoder.compute_logits(a), -1), F.log_softmax(decoder.compute_logits(b), -1)
    torch.testing.assert_close(next_token_kl(decoder, a, b, chunk_rows=3), (p.exp() * (p - q)).sum(-1))
    assert next_token_kl(decoder, a, a).abs().max() < 1e-6
    with pytest.raises(ValueError, match="shapes"):
        next_token_kl(decoder, a, b[:5])


def test_bad_inputs_are_named(tiny_model):
    model, _ = tiny_model
    decoder = decoder_from_hf_module(model)
    with pytest.raises(ValueError, match="empty"):
        next(teacher_forced_steps(decoder, [[1, 2], []]))
    with pytest.raises(ValueError, match="step_tokens"):
        next(teacher_forced_steps(decoder, [[1, 2]], 0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        next(teacher_forced_steps(decoder, [[1] * (decoder.config.max_position_embeddings + 1)]))
