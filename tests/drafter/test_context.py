"""The device-side drafting context equals the one built from each sequence's whole history."""

import pytest
import torch

from slipstream.drafter import DraftContext
from slipstream.drafter.context import ContextWindows
from slipstream.rollout.types import Request, SamplingParams

WINDOW = 6


@pytest.mark.parametrize("static", [False, True], ids=["eager-steps", "replays-of-4-steps"])
def test_windows_match_the_full_history_through_prefill_prefix_sharing_and_growth(toy, static):
    # Replays hand 4 steps of a sequence in one call, outside `run`'s inference mode before: a
    # ring grown in one and written in the other raised.
    decoder = toy.decoder()
    windows = ContextWindows(WINDOW, toy.hidden, max_seqs=2)  # 8 sequences: the rings grow
    history: dict[tuple, dict[int, tuple[torch.Tensor, int]]] = {}

    def record(sf):
        h = sf.hidden[-1]
        for r in range(h.shape[0]):
            key = sf.seq_keys[int(sf.owner[r])]
            history.setdefault(key, {})[int(sf.positions[r])] = (h[r].clone(), int(sf.token_ids[r]))

    several_steps = []  # a call of generated positions only (past the 9-token prompts), more rows than sequences

    def sink(sf):
        record(sf)
        several_steps.append(sf.token_ids.shape[0] > len(sf.seq_keys) and int(sf.positions.min()) >= 9)
        windows(sf)

    g = torch.Generator().manual_seed(0)
    # 9-token prompts, blocks of 4: the siblings of a group share two prefix blocks, so they
    # compute features from position 8 on; a 9-row prefill is longer than the window.
    params = SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=0)
    requests = [Request(torch.randint(toy.vocab, (9,), generator=g).tolist(), params, f"g{i}", f"r{i}")
                for i in range(2)]
    engine = toy.engine(decoder, sink)
    if static:
        engine.runner.use_static_decode()
    completions = engine.generate(requests)
    assert any(several_steps) == static
    keys = [(c.request_id, i % 4) for i, c in enumerate(completions)]
    assert {min(history[k]) for k in keys} == {0, 8}  # prefix sharing happened

    last = torch.tensor([c.tokens[-1] for c in completions])
    ctx = windows.context(keys, last)
    seqs = []
    for k, c in zip(keys, completions):
        first = min(history[k])
        positions = sorted(history[k])
        assert positions == list(range(first, len(c.prompt_ids) + len(c.tokens) - 1))
        feats = torch.stack([history[k][p][0] for p in positions])
        toks = torch.tensor([history[k][p][1] for p in positions] + [c.tokens[-1]])
        seqs.append((feats, toks, first))
    expected = DraftContext.from_sequences(seqs, WINDOW)
    assert torch.equal(ctx.lengths, expected.lengths)
    assert torch.equal(ctx.next_tokens, expected.next_tokens)
    assert torch.equal(ctx.positions, expected.positions)
    assert torch.equal(ctx.features, expected.features)

    windows.release(keys[:3])
    with pytest.raises(KeyError, match="no features captured"):
        windows.context(keys[:1], last[:1])
    windows.clear()
    assert windows.capacity >= 8


def test_a_short_sequence_is_left_padded():
    from slipstream.rollout.model_runner import StepFeatures

    windows = ContextWindows(4, 2)
    h = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    windows(StepFeatures([("a", 0)], torch.zeros(2, dtype=torch.long), torch.arange(2), torch.tensor([7, 8]),
                         {-1: h}))
    ctx = windows.context([("a", 0)], torch.tensor([9]))
    assert ctx.lengths.tolist() == [2]
    assert ctx.next_tokens.tolist() == [[0, 0, 8, 9]]
    assert ctx.features[0, :, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert ctx.positions[0, 2:].tolist() == [0, 1]


def test_rows_arriving_after_a_release_are_dropped_without_taking_a_slot():
    # The engine hands queued rows over lazily: a finished sequence's last rows may reach the
    # windows after its slot was given back (and taken by another sequence).
    from slipstream.rollout.model_runner import StepFeatures

    windows = ContextWindows(4, 2, max_seqs=1)

    def rows(keys, owner, positions, value):
        n = len(owner)
        return StepFeatures(keys, torch.tensor(owner), torch.tensor(positions), torch.arange(n) + 10,
                            {-1: torch.full((n, 2), value)})

    windows(rows([("a", 0)], [0], [0], 1.0))
    windows.release([("a", 0)])
    windows(rows([("b", 0), ("a", 0)], [0, 1, 1], [0, 1, 2], 2.0))  # b takes a's slot; a's late rows
    assert windows.capacity == 1 and list(windows._slots) == [("b", 0)]
    ctx = windows.context([("b", 0)], torch.tensor([5]))
    assert ctx.lengths.tolist() == [1] and ctx.features[0, -1].tolist() == [2.0, 2.0]
    with pytest.raises(KeyError, match="no features captured"):
        windows.context([("a", 0)], torch.tensor([5]))
    windows.clear()  # a new rollout may reuse the keys
    windows(rows([("a", 0)], [0], [3], 3.0))
    assert windows.context([("a", 0)], torch.tensor([5])).features[0, -1].tolist() == [3.0, 3.0]
