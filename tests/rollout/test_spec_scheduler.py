"""Speculative steps in the scheduler and block manager, against a stand-in model that reads a
simulated paged cache: drafts partly right and partly wrong, stops inside drafts, preemption."""

import random
from collections import Counter

import pytest

from slipstream.rollout.block_manager import BlockManager
from slipstream.rollout.scheduler import Scheduler
from slipstream.rollout.sequence import Sequence, SequenceStatus
from slipstream.rollout.types import Request, SamplingParams

VOCAB = 12  # small, so the true continuation often contains the stop token
EOS = 0


def next_token(context: list[int], salt: int) -> int:
    """The stand-in model: a pure function of the context (greedy decoding of a fixed 'model')."""
    return hash((salt, tuple(context))) % VOCAB


def oracle(prompt: list[int], params: SamplingParams, salt: int, max_model_len: int | None):
    ctx, out = list(prompt), []
    while True:
        t = next_token(ctx, salt)
        ctx.append(t)
        out.append(t)
        if t == EOS:
            return out, "stop"
        if len(out) >= params.max_tokens or (max_model_len and len(ctx) >= max_model_len):
            return out, "length"


def make_requests(num: int, seed: int):
    rng = random.Random(seed)
    reqs = []
    for i in range(num):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40))]
        reqs.append(Request(prompt, SamplingParams(n=rng.choice([1, 2, 3]), max_tokens=rng.randint(1, 40)),
                            group_id=f"g{i % 5}", request_id=f"r{i}"))
    return reqs


def draft_for(seq: Sequence, rng: random.Random, salt: int) -> list[int]:
    """Some true continuation tokens, then wrong ones (any of them may be the stop token)."""
    ctx = seq.token_ids
    draft = []
    for _ in range(rng.randint(0, 6)):
        t = next_token(ctx + draft, salt)
        draft.append(t)
    for _ in range(rng.randint(0, 6)):
        t = next_token(ctx + draft, salt)
        draft.append((t + rng.randrange(1, VOCAB)) % VOCAB)
    return draft


def check_prefix_map(bm: BlockManager, tok_cache: list[int]) -> None:
    """Every registered block holds, in the cache, exactly the tokens its key names: a later hit
    never reuses K/V of a draft token."""
    bs = bm.block_size
    for block in bm.hash_to_block.values():
        _, tokens = bm._block_key[block]
        assert tuple(tok_cache[block * bs:(block + 1) * bs]) == tokens


def run(requests, *, num_blocks, speculate, seed=0, block_size=4, max_num_batched_tokens=48,
        max_model_len=None):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens, chunk_size=16,
                      eos_token_ids=[EOS], max_model_len=max_model_len)
    seqs = [s for r in requests for s in Sequence.from_request(r)]
    sched.add(seqs)
    tok_cache = [-1] * (num_blocks * block_size)
    stats = Counter()
    while sched.has_work():
        drafts = {s.seq_id: draft_for(s, rng, s.sample_index) for s in sched.running
                  if not s.is_prefilling} if speculate else None
        decoding = [s for s in sched.running if not s.is_prefilling]
        batch = sched.schedule(drafts)
        inp = batch.build_inputs()
        assert batch.num_tokens <= max_num_batched_tokens
        scheduled = {id(e.seq) for e in batch.entries} | {id(s) for s in batch.preempted}
        assert all(id(s) in scheduled for s in decoding)  # drafts never crowd out a decode
        for slot, tok in zip(inp.slot_mapping.tolist(), inp.input_ids.tolist()):
            tok_cache[slot] = tok
        check_prefix_map(bm, tok_cache)
        emitted = []
        tables, lens = inp.block_tables.tolist(), inp.seq_lens.tolist()
        for s, e in enumerate(batch.entries):
            if not e.samples:
                continue
            seq = e.seq
            assert e.draft == tuple(drafts[seq.seq_id][:len(e.draft)]) if e.draft else True
            slots = [tables[s][p // block_size] * block_size + p % block_size for p in range(lens[s])]
            context = [tok_cache[x] for x in slots]
            assert context == seq.token_ids + list(e.draft)  # the cache holds the sequence, then the draft
            # Greedy verification: accept while the draft agrees with the model, then its token.
            out, base = [], len(seq.token_ids)
            for j in range(len(e.draft) + 1):
                t = next_token(context[:base + j], seq.sample_index)
                out.append(t)
                if j == len(e.draft) or t != e.draft[j]:
                    break
            emitted.append(out)
        stats["steps"] += 1
        stats["drafted"] += batch.num_draft_tokens
        stats["preemptions"] += len(batch.preempted)
        if batch.num_draft_tokens:
            sched.postprocess_verified(batch, emitted, [[-t / VOCAB for t in o] for o in emitted])
        else:
            sched.postprocess(batch, [o[0] for o in emitted], [-o[0] / VOCAB for o in emitted])
        stats["accepted"] += batch.num_accepted
        counts = Counter(b for s in sched.running for b in s.block_table)
        assert all(bm.ref_counts[b] == counts[b] for b in range(num_blocks))
        for s in sched.running:  # rolled back: one uncached token, no block past the sequence's tokens
            if s.output_ids and not s.is_prefilling:
                assert s.num_uncached_tokens == 1
                assert len(s.block_table) <= s.num_blocks_needed(block_size)
    assert all(s.is_finished for s in seqs)
    assert bm.num_free_blocks == num_blocks and all(r == 0 for r in bm.ref_counts)  # no leak
    for s in seqs:
        assert s.output_logprobs == [-t / VOCAB for t in s.output_ids]
    return {(s.request_id, s.sample_index): (s.output_ids, s.finish_reason) for s in seqs}, stats


@pytest.mark.parametrize("num_blocks", [400, 30])
def test_speculative_steps_match_the_oracle_roll_back_and_never_register_drafts(num_blocks):
    requests = make_requests(60, seed=1)
    max_model_len = 60
    expected = {(r.request_id, i): oracle(r.prompt_ids, r.params, i, max_model_len)
                for r in requests for i in range(r.params.n)}
    assert {reason for _, reason in expected.values()} == {"stop", "length"}
    plain, plain_stats = run(requests, num_blocks=num_blocks, speculate=False, max_model_len=max_model_len)
    spec, spec_stats = run(requests, num_blocks=num_blocks, speculate=True, max_model_len=max_model_len)
    assert plain == spec == expected
    assert spec_stats["drafted"] > spec_stats["accepted"] > 0  # both acceptance and rollback happened
    assert spec_stats["steps"] < plain_stats["steps"]
    if num_blocks == 30:
        assert spec_stats["preemptions"] > 0


def _decoding_seq(bm, prompt, max_tokens=100):
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=[EOS])
    seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens))
    sched.add(seq)
    batch = sched.schedule()
    sched.postprocess(batch, [5], [0.0])
    return sched, seq


def test_a_stop_token_inside_the_accepted_draft_truncates_and_frees_everything():
    bm = BlockManager(16, 4)
    sched, seq = _decoding_seq(bm, [1, 2, 3])
    batch = sched.schedule({seq.seq_id: [6, EOS, 7, 8]})
    assert batch.entries[0].draft == (6, EOS, 7, 8) and len(seq.block_table) == 2
    finished = sched.postprocess_verified(batch, [[6, EOS, 7, 9]], [[-1.0, -2.0, -3.0, -4.0]])
    assert finished == [seq] and seq.finish_reason == "stop"
    assert seq.output_ids == [5, 6, EOS] and seq.output_logprobs == [0.0, -1.0, -2.0]
    assert bm.num_free_blocks == 16


def test_drafts_are_cut_to_the_room_left_by_max_tokens_max_model_len_budget_and_kernel():
    bm = BlockManager(64, 4)
    sched, seq = _decoding_seq(bm, [1, 2, 3], max_tokens=4)  # 1 generated: 3 more may be emitted
    batch = sched.schedule({seq.seq_id: list(range(1, 11))})
    assert batch.entries[0].draft == (1, 2)  # 2 drafts + 1 sampled token = the 3 left
    sched2, seq2 = _decoding_seq(BlockManager(64, 4), [1] * 3)
    assert sched2.schedule({seq2.seq_id: [3] * 40}).entries[0].num_new == 16  # the decode kernel's width
    sched3 = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=[EOS],
                       max_model_len=8)
    seq3 = Sequence([1, 2, 3], SamplingParams(max_tokens=100))
    sched3.add(seq3)
    sched3.postprocess(sched3.schedule(), [5], [0.0])
    assert sched3.schedule({seq3.seq_id: [3] * 10}).entries[0].draft == (3, 3, 3)  # 4 tokens to reach 8


def test_a_draft_that_needs_missing_blocks_is_dropped_instead_of_preempting():
    bm = BlockManager(2, 4)
    sched, seq = _decoding_seq(bm, [1, 2, 3])  # 4 tokens: one full block, one free
    batch = sched.schedule({seq.seq_id: [1] * 8})  # 9 slots would need 3 blocks
    assert batch.entries[0].draft == () and batch.entries[0].num_new == 1 and not batch.preempted


def test_accepted_blocks_are_registered_and_rejected_slots_freed():
    bm = BlockManager(16, 4)
    sched, seq = _decoding_seq(bm, [1, 2, 3])  # tokens [1, 2, 3, 5], block 0 registered at schedule
    batch = sched.schedule({seq.seq_id: [6, 7, 8, 9, 10, 11]})  # positions 3..9: three blocks
    assert len(seq.block_table) == 3 and len(bm.hash_to_block) == 1
    sched.postprocess_verified(batch, [[6, 7, 8, 12]])  # 3 accepted, then 12: tokens up to position 7
    assert seq.token_ids == [1, 2, 3, 5, 6, 7, 8, 12] and seq.num_cached_tokens == 7
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 14  # the third block went back
    assert len(bm.hash_to_block) == 1  # block 1 holds 12, which is not computed yet
    batch = sched.schedule()
    assert len(bm.hash_to_block) == 2  # now block 1 fills with accepted tokens only
    assert bm._block_key[seq.block_table[1]][1] == (6, 7, 8, 12)


def test_postprocess_verified_rejects_results_that_contradict_the_draft():
    bm = BlockManager(16, 4)
    sched, seq = _decoding_seq(bm, [1, 2, 3])
    batch = sched.schedule({seq.seq_id: [6, 7]})
    with pytest.raises(ValueError, match="do not start with the accepted part"):
        sched.postprocess_verified(batch, [[6, 9, 1]])
    with pytest.raises(ValueError, match="1..3 expected"):
        sched.postprocess_verified(batch, [[6, 7, 8, 9]])
    with pytest.raises(ValueError, match="use postprocess_verified"):
        sched.postprocess(batch, [1])
    assert seq.status is SequenceStatus.RUNNING and seq.output_ids == [5]


def test_a_draft_never_takes_the_block_a_later_sequence_needs():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=[EOS])
    old, new = Sequence([1, 2, 3], SamplingParams(max_tokens=100)), Sequence([4, 5, 6], SamplingParams(max_tokens=100))
    sched.add([old, new])
    sched.postprocess(sched.schedule(), [7, 8], [0.0, 0.0])  # each holds one full block; two are free
    batch = sched.schedule({old.seq_id: [1, 1, 1, 1, 1, 1, 1, 1]})  # would take both free blocks
    assert batch.entries[0].draft == () and not batch.preempted  # dropped: `new` needs the other one
    sched.postprocess(batch, [9, 9], [0.0, 0.0])
    batch = sched.schedule({old.seq_id: [1, 1, 1]})  # positions 5..8 fit the block its token starts
    assert batch.entries[0].draft == (1, 1, 1) and not batch.preempted
