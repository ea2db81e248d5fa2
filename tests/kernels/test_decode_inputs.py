"""The multi-step decode inputs kernel (Triton interpreter) against its torch path and by hand."""

import torch

from slipstream.kernels.decode_inputs import (advance_replay_inputs, advance_replay_inputs_torch, decode_inputs,
                                              decode_inputs_torch)


def test_decode_inputs_match_torch_and_the_block_tables():
    bs = 4
    tables = torch.tensor([[7, 2, 9, 0], [5, 0, 0, 0], [3, 8, 1, 6]], dtype=torch.int64)
    pos0 = torch.tensor([6, 0, 10], dtype=torch.int64)
    lens0 = pos0 + 1
    draws = torch.tensor([11.0, 3.0, 42.0], dtype=torch.float64)  # the sampler's float64 tokens
    for step in range(3):
        ids, pos, lens, slots = decode_inputs(draws, pos0, lens0, tables, step, bs)
        ref = decode_inputs_torch(draws, pos0, lens0, tables, step, bs)
        for got, want in zip((ids, pos, lens, slots), ref):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert ids.tolist() == [11, 3, 42] and lens.dtype == torch.int32
        assert lens.tolist() == [7 + step, 1 + step, 11 + step]
        # by hand: row 0 at position 6 + step sits in its second block (2) from position 8 on
        p = 6 + step
        assert slots[0].item() == tables[0, p // bs].item() * bs + p % bs
        assert slots[2].item() == tables[2, (10 + step) // bs].item() * bs + (10 + step) % bs


def test_advance_replay_inputs_moves_real_rows_and_keeps_padding_rows():
    def state():
        # rows 0-1 decode (lengths >= 2), rows 2-3 pad (length 1 at position 0)
        return [torch.tensor([5, 6, 0, 0]), torch.tensor([9, 30, 0, 0]), torch.tensor([10, 31, 1, 1]),
                torch.tensor([100])]

    tokens = torch.tensor([7.0, 8.0, 3.0, 3.0], dtype=torch.float64)
    got, want = state(), state()
    advance_replay_inputs(*got, tokens, 4)
    advance_replay_inputs_torch(*want, tokens, 4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ids, pos, lens, seed = got
    assert ids.tolist() == [7, 8, 3, 3] and pos.tolist() == [13, 34, 0, 0] and lens.tolist() == [14, 35, 1, 1]
    assert seed.item() == 104
