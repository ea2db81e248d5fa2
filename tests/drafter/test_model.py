"""The drafter model: segment boundaries and the attention window hold, chained drafting with its
key/value cache equals recomputing the whole chain, and only the drafter's own weights are state."""

import torch

from slipstream.drafter import DraftContext, Drafter, DrafterConfig, TargetHead
from tests.drafter.random_target import random_target

V, H = 24, 32


def _drafter(window=64, **kw) -> Drafter:
    c, target = random_target(V, H, heads=4, kv_heads=2, intermediate=48)
    torch.manual_seed(1)
    return Drafter(c, TargetHead.from_decoder(target), DrafterConfig(window=window, **kw))


def _inputs(L=12, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, H, generator=g), torch.randint(V, (B, L), generator=g),
            torch.arange(L).repeat(B, 1))


def test_packed_segments_do_not_see_each_other():
    d = _drafter()
    feats, toks, pos = _inputs()
    segments = torch.tensor([[0] * 5 + [1] * 7])
    out = d(feats, toks, pos, segments)
    changed = feats.clone()
    changed[0, :5] += 3.0  # perturb the first segment only
    out2 = d(changed, toks, pos, segments)
    assert torch.equal(out[0, 5:], out2[0, 5:])
    assert not torch.allclose(out[0, :5], out2[0, :5])
    # control: as one segment, the same perturbation reaches the later rows
    one = torch.zeros_like(segments)
    assert not torch.allclose(d(feats, toks, pos, one)[0, 5:], d(changed, toks, pos, one)[0, 5:])


def test_padding_rows_change_nothing():
    d = _drafter()
    feats, toks, pos = _inputs()
    segments = torch.tensor([[0] * 8 + [-1] * 4])
    out = d(feats, toks, pos, segments)
    changed = feats.clone()
    changed[0, 8:] = 100.0
    assert torch.equal(out[0, :8], d(changed, toks, pos, segments)[0, :8])
    assert torch.isfinite(out).all()


def test_attention_sees_only_the_window():
    d = _drafter(window=4)
    feats, toks, pos = _inputs()
    seg = torch.zeros(1, 12, dtype=torch.long)
    out = d(feats, toks, pos, seg)
    changed = feats.clone()
    changed[0, 3] += 5.0
    out2 = d(changed, toks, pos, seg)
    assert torch.equal(out[0, 7:], out2[0, 7:])  # rows >= 3 + window do not see row 3
    assert not torch.allclose(out[0, 3:7], out2[0, 3:7])


def test_chained_draft_equals_recomputing_the_whole_chain():
    d = _drafter(window=6)
    g = torch.Generator().manual_seed(3)
    seqs = [(torch.randn(n, H, generator=g), torch.randint(V, (n + 1,), generator=g), 5) for n in (9, 3, 1)]
    ctx = DraftContext.from_sequences(seqs, window=6)
    k = 4
    draft = d.draft(ctx, k, torch.tensor([1.0, 0.7, 0.0]), generator=torch.Generator().manual_seed(0))
    assert draft.tokens.shape == (3, k) and draft.probs.shape == (3, k, V)
    assert torch.allclose(draft.probs.sum(-1), torch.ones(3, k))
    assert torch.equal(draft.probs[2].argmax(-1), draft.tokens[2]) and bool((draft.probs[2].max(-1).values == 1).all())
    for b, (feats, toks, first) in enumerate(seqs):
        # Teacher-force the drafter's own chain: rows (h_t, x_{t+1}) then (h^_{t+1}, d_1), ...
        rows_f, rows_x = list(feats), list(toks[1:])
        for j in range(k):
            f = torch.stack(rows_f)[None]
            x = torch.stack(rows_x)[None]
            pos = torch.arange(first, first + f.shape[1])[None]
            out = d(f, x, pos, torch.zeros_like(x))[0, -1]
            probs = d.logits(out)
            t = [1.0, 0.7, 0.0][b]
            if t > 0:
                assert torch.allclose(draft.probs[b, j], (probs / t).softmax(-1), atol=1e-5)
            else:
                assert int(draft.tokens[b, j]) == int(probs.argmax())
            rows_f.append(out)
            rows_x.append(draft.tokens[b, j])


def test_state_dict_holds_only_the_drafters_weights():
    d = _drafter()
    keys = set(d.state_dict())
    assert keys and not any(k.startswith("head") for k in keys)
    assert sum(p.numel() for p in d.parameters()) == sum(v.numel() for v in d.state_dict().values())
    r = d.replica()
    assert r.head is d.head
    feats, toks, pos = _inputs()
    seg = torch.zeros(1, 12, dtype=torch.long)
    assert torch.equal(d(feats, toks, pos, seg), r(feats, toks, pos, seg))


def test_context_needs_one_more_token_than_features():
    import pytest

    with pytest.raises(ValueError, match="needs 4 tokens"):
        DraftContext.from_sequences([(torch.zeros(3, H), torch.zeros(3, dtype=torch.long), 0)], window=8)
