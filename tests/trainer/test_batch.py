import torch

from slipstream.rollout.types import Completion
from slipstream.trainer.actor import response_logprobs
from slipstream.trainer.batch import build_batch


def _completions():
    return [
        Completion("a", "g0", [5, 6, 7], [8, 9], [-1.0, -2.0], "stop"),
        Completion("b", "g0", [5, 6, 7], [10, 11, 12, 13], [-0.5, -0.1, -0.2, -0.3], "length"),
        Completion("c", "g1", [4], [14], [-3.0], "stop"),
    ]


def test_layout_puts_every_response_at_the_same_column():
    b = build_batch(_completions(), [1.0, 0.0, 1.0], pad_id=0)
    P = b.prompt_width
    assert P == 3 and b.response_width == 4
    assert b.input_ids[0, P : P + 2].tolist() == [8, 9]
    assert b.input_ids[2, P - 1 : P + 1].tolist() == [4, 14]
    assert b.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.allclose(b.rollout_logprobs[1], torch.tensor([-0.5, -0.1, -0.2, -0.3]))
    assert b.group_ids.tolist() == [0, 0, 1]
    # positions count only real tokens: the left-padded row starts at 0
    assert b.position_ids[2, P - 1 : P + 1].tolist() == [0, 1]
    assert b.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_padded_batch_logprobs_equal_each_sequence_alone(tiny_model):
    model, _ = tiny_model
    comps = _completions()
    batch = build_batch(comps, [0.0] * 3, pad_id=0)
    got = response_logprobs(model, batch, torch.device("cpu"))
    for i, c in enumerate(comps):
        ids = torch.tensor([c.prompt_ids + c.tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(c.prompt_ids) - 1 : -1]
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(got[i, : len(c.tokens)].detach(), ref, atol=1e-5)
        assert (got[i, len(c.tokens) :] == 0).all()


def test_token_budget_micro_batches_fill_up_and_agree_on_a_count():
    from slipstream.trainer.batch import MicroBatching, length_grouped

    widths = [1, 1, 1, 1, 2, 2, 5, 9]  # response lengths; every prompt 2 tokens wide
    comps = [Completion(str(i), "g", [5, 6], list(range(7, 7 + w)), [-1.0] * w, "stop")
             for i, w in enumerate(reversed(widths))]
    batch = build_batch(comps, [0.0] * len(comps), pad_id=0)
    cpu = torch.device("cpu")
    parts = length_grouped(batch, MicroBatching(rows=2, tokens=12), cpu)
    # 4 rows of 1 (4 x 3 = 12 tokens), 2 of 2 (2 x 4), then 5 and 9 alone (2 x 7 > 12)
    assert [len(m.rows) for m in parts] == [4, 2, 1, 1] and [m.width for m in parts] == [1, 2, 5, 9]
    assert all(len(m.rows) * (2 + m.width) <= 12 or len(m.rows) == 1 for m in parts)
    assert sorted(torch.cat([m.rows for m in parts]).tolist()) == list(range(8))
    # another rank needs 6: this one splits its costliest groups until it runs as many
    agreed = length_grouped(batch, MicroBatching(rows=2, tokens=12, agree=lambda n: max(n, 6)), cpu)
    assert [len(m.rows) for m in agreed] == [2, 2, 1, 1, 1, 1]
    assert sorted(torch.cat([m.rows for m in agreed]).tolist()) == list(range(8))
    # rows mode as before: `rows` rows each
    assert [len(m.rows) for m in length_grouped(batch, MicroBatching(rows=3), cpu)] == [3, 3, 2]
