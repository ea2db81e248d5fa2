"""The drafter's chain through `DraftGraphs`' padded static buffers (the layout its CUDA graphs
replay) drafts what the eager chain drafts with the same noise, whatever the padding."""

import torch

from slipstream.drafter import DraftContext, Drafter, DrafterConfig, DrafterSlot, TargetHead
from slipstream.drafter.draft_graphs import DraftGraphs, chain_lengths

WINDOW = 8


def _drafter(toy) -> Drafter:
    torch.manual_seed(3)
    return Drafter(toy.decoder().config, TargetHead.from_decoder(toy.decoder()), DrafterConfig(window=WINDOW,
                                                                                                max_draft_len=6))


def _context(toy, n: int, seed: int) -> DraftContext:
    """n requests with 1..WINDOW known pairs each, right-aligned in WINDOW columns."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for b in range(n):
        m = 1 + b % WINDOW
        seqs.append((torch.randn(m, toy.hidden, generator=g), torch.randint(toy.vocab, (m + 1,), generator=g), 5 * b))
    ctx = DraftContext.from_sequences(seqs, WINDOW)
    if ctx.next_tokens.shape[1] < WINDOW:  # as `ContextWindows` gives it: always the full window
        pad = WINDOW - ctx.next_tokens.shape[1]
        ctx = DraftContext(torch.nn.functional.pad(ctx.features, (0, 0, pad, 0)),
                           torch.nn.functional.pad(ctx.next_tokens, (pad, 0)),
                           torch.nn.functional.pad(ctx.positions, (pad, 0)), ctx.lengths)
    return ctx


def test_static_chain_matches_the_eager_chain_with_padding(toy):
    drafter = _drafter(toy)
    graphs = DraftGraphs(drafter, max_batch=16, capture=False)
    assert chain_lengths(6) == [1, 2, 4, 6] and graphs.buckets == [1, 2, 4, 8, 16]
    for n, k in ((3, 3), (8, 5), (1, 1), (11, 6)):  # padded to 4, 8, 1, 16 rows; k rounded to 4, 6, 1, 6
        ctx = _context(toy, n, seed=n)
        temperature = torch.tensor([0.0 if b % 3 == 0 else 1.0 for b in range(n)])
        out = graphs.draft(ctx, k, temperature, generator=torch.Generator().manual_seed(n))
        K = next(x for x in (1, 2, 4, 6) if x >= k)
        assert out.tokens.shape == (n, K) and out.probs.shape == (n, K, toy.vocab)
        # the same chain, eagerly, on the unpadded rows with the noise the static buffers held
        ref = drafter.draft(ctx, K, temperature, noise=graphs.noise[:n, :K])
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.probs, ref.probs, atol=1e-5, rtol=1e-4)
        greedy = temperature == 0
        assert torch.equal(out.probs[greedy].amax(-1), torch.ones(int(greedy.sum()), K))  # one-hot q


def test_too_many_rows_or_truncation_draft_eagerly(toy):
    drafter = _drafter(toy)
    graphs = DraftGraphs(drafter, max_batch=4, capture=False)
    ctx = _context(toy, 6, seed=1)
    out = graphs.draft(ctx, 2, torch.zeros(6))
    assert out.tokens.shape == (6, 2) and not graphs.graphs  # no bucket holds 6 rows
    ctx = _context(toy, 2, seed=2)
    out = graphs.draft(ctx, 3, torch.ones(2), top_p=torch.full((2,), 0.9), top_k=torch.zeros(2, dtype=torch.long))
    assert out.tokens.shape == (2, 3) and not graphs.graphs


def test_slot_drafts_through_the_graphs_and_sees_published_weights(toy):
    drafter = _drafter(toy)
    slot = DrafterSlot(drafter, graph_batch=8)
    ctx = _context(toy, 5, seed=4)
    before = slot.draft(ctx, 4, torch.zeros(5))
    assert before.version == 0
    assert torch.equal(before.tokens, drafter.draft(ctx, 4, torch.zeros(5)).tokens)
    other = _drafter(toy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    slot.publish(other.state_dict())
    after = slot.draft(ctx, 4, torch.zeros(5))
    assert after.version == 1
    assert torch.equal(after.tokens, other.draft(ctx, 4, torch.zeros(5)).tokens)
