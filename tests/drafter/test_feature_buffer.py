"""The feature ring: EAGLE pairs within a sequence's consecutive positions only, newest rows win,
eviction by capacity and by RL-step age, and packed batches that keep their pieces apart."""

import pytest
import torch

from slipstream.drafter import DrafterConfig, FeatureBuffer
from slipstream.rollout.model_runner import StepFeatures

H = 4


def _step(rows, layer=-1, mark=0.0) -> StepFeatures:
    """rows: (seq index, position) per packed row. hidden = [seq, position, mark, 0]; token = 100 * seq + position."""
    keys = sorted({s for s, _ in rows})
    owner = torch.tensor([keys.index(s) for s, _ in rows])
    pos = torch.tensor([p for _, p in rows])
    seq = torch.tensor([s for s, _ in rows], dtype=torch.float32)
    hidden = torch.stack([seq, pos.float(), torch.full_like(seq, mark), torch.zeros_like(seq)], dim=1)
    return StepFeatures([(f"r{s}", 0) for s in keys], owner, pos, 100 * torch.tensor([s for s, _ in rows]) + pos,
                        {layer: hidden})


def _buffer(**kw) -> FeatureBuffer:
    cfg = DrafterConfig(**{"buffer_tokens": 1024, "batch_tokens": 64, "seq_len": 16, **kw})
    return FeatureBuffer(cfg, H)


def _check_alignment(batch):
    v = batch.valid
    f, t = batch.features[v], batch.target_features[v]
    assert torch.equal(f[:, 0], t[:, 0])  # same sequence
    assert torch.equal(t[:, 1], f[:, 1] + 1)  # the next position
    assert torch.equal(batch.positions[v].float(), f[:, 1])
    assert torch.equal(batch.next_tokens[v], (100 * t[:, 0] + t[:, 1]).long())  # x_{t+1}
    # Within a piece: one sequence, consecutive positions.
    for b in range(batch.segment_ids.shape[0]):
        for s in batch.segment_ids[b].unique().tolist():
            rows = batch.features[b][batch.segment_ids[b] == s]
            assert (rows[:, 0] == rows[0, 0]).all()
            assert torch.equal(rows[:, 1], rows[0, 1] + torch.arange(rows.shape[0]).float())


def test_pairs_stay_within_sequences_across_prefill_and_decode_steps():
    buf = _buffer()
    buf(_step([(0, p) for p in range(5)] + [(1, p) for p in range(3)]))  # prefill of two sequences
    for p in range(5, 12):  # decode steps: one row per sequence per step
        buf(_step([(1, p - 2), (0, p)]))
    assert buf.num_pairs() == 11 + 9
    batch = buf.sample(torch.Generator().manual_seed(0))
    assert batch.features.shape == (4, 16, H)
    _check_alignment(batch)
    assert batch.newest_step == 0 and batch.mean_step == 0.0


def test_a_gap_in_positions_breaks_the_pairs_and_a_recomputed_position_keeps_its_newest_row():
    buf = _buffer()
    buf(_step([(0, p) for p in (0, 1, 2, 4, 5)]))  # position 3 missing (e.g. cached by a sibling)
    buf(_step([(0, 5)], mark=1.0))  # position 5 computed again (preemption, recompute)
    assert buf.num_pairs() == 3  # 0->1, 1->2, 4->5
    batch = buf.sample(torch.Generator().manual_seed(0))
    _check_alignment(batch)
    v = batch.valid
    assert not ((batch.features[v][:, 1] == 2) | (batch.features[v][:, 1] == 3)).any()
    last = batch.target_features[v][batch.target_features[v][:, 1] == 5]
    assert len(last) and (last[:, 2] == 1.0).all()


def test_eviction_by_capacity_drops_the_oldest_steps():
    buf = _buffer(buffer_tokens=10)
    for s in range(3):
        buf(_step([(s, p) for p in range(4)]))
    assert len(buf) == 8
    batch = buf.sample(torch.Generator().manual_seed(0))
    assert set(batch.features[batch.valid][:, 0].tolist()) == {1.0, 2.0}
    _check_alignment(batch)  # the ring wrapped around: rows 8..9 then 0..1 hold one step


def test_eviction_by_age_in_rl_steps():
    buf = _buffer(buffer_max_age=1)
    for step in range(3):
        buf.set_step(step)
        buf(_step([(step, p) for p in range(4)]))
    assert len(buf) == 8  # step 0 is older than one step before step 2
    batch = buf.sample(torch.Generator().manual_seed(0))
    assert set(batch.data_steps[batch.valid].tolist()) == {1, 2}
    assert set(batch.features[batch.valid][:, 0].tolist()) == {1.0, 2.0}
    assert batch.newest_step == 2


def test_same_request_id_in_two_rl_steps_are_different_sequences():
    buf = _buffer(buffer_max_age=5)
    buf(_step([(0, p) for p in range(3)]))
    buf.set_step(1)
    buf(_step([(0, p) for p in range(3, 6)]))  # positions continue, but it is a new rollout
    assert buf.num_pairs() == 4


def test_empty_buffer_gives_no_batch_and_a_missing_layer_is_named():
    buf = _buffer()
    assert buf.sample() is None
    with pytest.raises(KeyError, match="capture layer -1.*captured \\[3\\]"):
        buf(_step([(0, 0)], layer=3))


def test_pinned_storage_needs_cuda():
    if torch.cuda.is_available():
        assert _buffer(buffer_storage="pinned")._hidden.is_pinned()
    else:
        with pytest.raises(ValueError, match="pinned needs CUDA"):
            _buffer(buffer_storage="pinned")


def test_sampling_without_refresh_reuses_the_index_until_indexed_rows_are_overwritten():
    buf = _buffer(buffer_tokens=40)
    buf(_step([(0, p) for p in range(10)]))
    buf.sample(torch.Generator().manual_seed(0))  # indexes sequence 0's rows
    buf(_step([(1, p) for p in range(10)]))
    stale = buf.sample(torch.Generator().manual_seed(0), refresh=False)
    assert set(stale.features[stale.valid][:, 0].tolist()) == {0.0}  # the new rows are not read
    fresh = buf.sample(torch.Generator().manual_seed(0))
    assert set(fresh.features[fresh.valid][:, 0].tolist()) == {0.0, 1.0}
    # Index over 20 of 40 rows; 25 more rows overwrite indexed ones: the index is rebuilt anyway.
    buf(_step([(2, p) for p in range(10)]))
    buf(_step([(3, p) for p in range(15)]))
    after = buf.sample(torch.Generator().manual_seed(0), refresh=False)
    assert set(after.features[after.valid][:, 0].tolist()) == {1.0, 2.0, 3.0}
    _check_alignment(after)


def test_sampling_one_steps_pairs():
    buf = _buffer(buffer_max_age=5)
    for step in range(3):
        buf.set_step(step)
        buf(_step([(step, p) for p in range(6)]))
    for step in range(3):
        batch = buf.sample(torch.Generator().manual_seed(step), step=step)
        assert set(batch.data_steps[batch.valid].tolist()) == {step}
        assert set(batch.features[batch.valid][:, 0].tolist()) == {float(step)}
        _check_alignment(batch)
    assert buf.sample(torch.Generator().manual_seed(0), step=7) is None
