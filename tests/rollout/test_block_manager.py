import pytest

from slipstream.rollout.block_manager import BlockManager
from slipstream.rollout.sequence import Sequence
from slipstream.rollout.types import SamplingParams


def _seq(prompt, n=1):
    return Sequence(list(prompt), SamplingParams(n=n), request_id="r", group_id="g")


def _prefill(bm, seq):
    """Allocate and mark the whole context computed, as a finished prefill step would."""
    bm.allocate(seq)
    bm.commit(seq, seq.num_tokens)
    seq.num_cached_tokens = seq.num_tokens


def _assert_consistent(bm, holders):
    counts = [0] * bm.num_blocks
    for s in holders:
        for b in s.block_table:
            counts[b] += 1
    assert bm.ref_counts == counts
    assert all(bm.is_free(b) == (counts[b] == 0) for b in range(bm.num_blocks))
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_free_blocks == counts.count(0)
    for h, b in bm.hash_to_block.items():  # map entries always describe their block
        assert bm.block_hash[b] == h


def test_allocate_and_free_accounting():
    bm = BlockManager(10, 4)
    a, b = _seq(range(9)), _seq(range(100, 103))
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 4
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 0
    _assert_consistent(bm, [a, b])
    bm.deallocate(a)
    assert a.block_table == [] and a.num_cached_tokens == 0
    assert bm.num_free_blocks == 9
    _assert_consistent(bm, [b])
    with pytest.raises(RuntimeError, match="already holds blocks"):
        bm.allocate(b)


def test_group_shares_full_prompt_blocks_but_never_the_partial_last_one():
    bm = BlockManager(16, 4)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + a partial one
    group = [_seq(prompt) for _ in range(4)]
    first = group[0]
    bm.allocate(first)
    bm.commit(first, 10)  # its prefill is scheduled: the two full blocks become shareable
    assert first.num_cached_tokens == 0
    assert bm.block_hash[first.block_table[2]] is None  # partial: never hashed
    for s in group[1:]:
        bm.allocate(s)
        assert s.block_table[:2] == first.block_table[:2]
        assert s.num_cached_tokens == 8  # only tokens 8, 9 are computed again
    shared = first.block_table[:2]
    assert [bm.ref_counts[b] for b in shared] == [4, 4]
    tails = {s.block_table[2] for s in group}
    assert len(tails) == 4 and all(bm.ref_counts[b] == 1 for b in tails)
    assert bm.num_used_blocks == 2 + 4
    _assert_consistent(bm, group)
    for s in group:
        bm.deallocate(s)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.ref_counts)


def test_block_holding_the_last_token_is_recomputed_not_shared():
    bm = BlockManager(8, 4)
    a, b = _seq(range(8)), _seq(range(8))  # two full blocks; token 7 must be computed by b
    _prefill(bm, a)
    assert bm.block_hash[a.block_table[1]] is not None  # full and computed: registered
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    _assert_consistent(bm, [a, b])


def test_blocks_are_not_shared_before_their_computation_is_scheduled():
    bm = BlockManager(8, 4)
    a, b = _seq(range(12)), _seq(range(12))
    bm.allocate(a)
    bm.allocate(b)  # a has not scheduled anything: nothing to reuse
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    c = _seq(range(12))
    bm.commit(a, 5)  # a chunk of 5 tokens fills block 0 only
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]


def test_hash_is_chained_over_the_whole_prefix():
    bm = BlockManager(8, 4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _prefill(bm, a)
    b = _seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # second block equal, first differs
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)


def test_freed_blocks_keep_their_prefix_until_reused_then_the_entry_is_dropped():
    bm = BlockManager(6, 4)
    a = _seq(range(10))
    _prefill(bm, a)
    kept = a.block_table[:2]
    bm.deallocate(a)
    assert bm.num_free_blocks == 6 and all(bm.is_free(b) for b in kept)
    assert len(bm.hash_to_block) == 2

    again = _seq(range(10))  # a later group with the same prompt hits the freed blocks
    bm.allocate(again)
    assert again.block_table[:2] == kept and again.num_cached_tokens == 8
    assert bm.num_free_blocks == 3 and all(bm.ref_counts[b] == 1 for b in kept)
    _assert_consistent(bm, [again])
    bm.deallocate(again)

    # Unhashed free blocks are reused first; hashed ones only when nothing else is left.
    filler = _seq(range(500, 516))  # 4 blocks
    bm.allocate(filler)
    assert not set(filler.block_table) & set(kept)
    assert len(bm.hash_to_block) == 2
    filler2 = _seq(range(600, 608))  # the last 2 free blocks: the cached prefix is evicted
    bm.allocate(filler2)
    assert set(filler2.block_table) == set(kept)
    assert bm.hash_to_block == {} and all(bm.block_hash[b] is None for b in kept)
    _assert_consistent(bm, [filler, filler2])
    bm.deallocate(filler)
    bm.deallocate(filler2)
    late = _seq(range(10))
    bm.allocate(late)
    assert late.num_cached_tokens == 0  # stale content is never hit


def test_can_allocate_counts_hits_on_blocks_in_use_as_free():
    bm = BlockManager(4, 4)
    a = _seq(range(9))  # 3 blocks, 2 of them full
    _prefill(bm, a)
    assert bm.num_free_blocks == 1
    b = _seq(range(9))  # needs 3 blocks, 2 shared with a: fits in the 1 free block
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.num_free_blocks == 0
    c = _seq(range(100, 102))
    assert not bm.can_allocate(c)
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        bm.allocate(c)
    _assert_consistent(bm, [a, b])


def test_may_append_grows_at_block_boundaries_and_registers_filled_blocks():
    bm = BlockManager(4, 4)
    s = _seq(range(3))
    _prefill(bm, s)
    assert len(s.block_table) == 1 and bm.hash_to_block == {}
    s.append_token(3)  # token at position 3 fills block 0 when its decode step runs
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 1 and bm.hash_to_block == {bm.block_hash[s.block_table[0]]: s.block_table[0]}
    s.num_cached_tokens = 4
    s.append_token(4)  # position 4 starts block 1
    bm.may_append(s)
    assert len(s.block_table) == 2 and bm.block_hash[s.block_table[1]] is None
    s.num_cached_tokens = 5
    # Full cache: no room to grow past block 4.
    other = _seq(range(100, 108))
    bm.allocate(other)
    assert bm.num_free_blocks == 0
    for t in range(5, 8):
        s.append_token(t)
        bm.may_append(s)
        s.num_cached_tokens += 1
    s.append_token(8)
    assert not bm.can_append(s)
    with pytest.raises(RuntimeError, match="no free block"):
        bm.may_append(s)
    # A generated continuation is shared too once computed.
    twin = _seq(range(8))
    bm.deallocate(other)
    bm.allocate(twin)
    assert twin.num_cached_tokens == 4 and twin.block_table[0] == s.block_table[0]


def test_disabled_prefix_caching_and_reset():
    off = BlockManager(8, 4, enable_prefix_caching=False)
    a, b = _seq(range(9)), _seq(range(9))
    _prefill(off, a)
    off.allocate(b)
    assert b.num_cached_tokens == 0 and off.hash_to_block == {}

    bm = BlockManager(8, 4)
    a = _seq(range(9))
    _prefill(bm, a)
    bm.reset_prefix_cache()  # e.g. new weights: cached K/V are stale
    b = _seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    bm.commit(b, 9)
    c = _seq(range(9))
    bm.allocate(c)  # chains computed after the reset are shared again
    assert c.num_cached_tokens == 8 and c.block_table[:2] == b.block_table[:2]
    for s in (a, b, c):
        bm.deallocate(s)
    assert bm.num_free_blocks == 8 and all(r == 0 for r in bm.ref_counts)
