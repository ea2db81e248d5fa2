import random
from collections import Counter

import pytest
import torch

from slipstream.rollout.block_manager import BlockManager
from slipstream.rollout.scheduler import Scheduler
from slipstream.rollout.sequence import Sequence, SequenceStatus
from slipstream.rollout.types import Request, SamplingParams

VOCAB = 40
EOS = 0


def next_token(context: list[int], salt) -> int:
    """The stand-in model: a pure function of the whole context (and of a per-sample salt that
    plays the sampler's randomness, so the samples of a group can diverge)."""
    return hash((salt, tuple(context))) % VOCAB


def _salt(seq: Sequence, seeds: dict[str, int]):
    seed = seeds.get(seq.request_id)
    return 0 if seed is None else (seed, seq.sample_index)


def expected_output(prompt, params, salt, max_model_len):
    ctx, out = list(prompt), []
    while True:
        t = next_token(ctx, salt)
        ctx.append(t)
        out.append(t)
        if t == EOS or t in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens or (max_model_len and len(ctx) >= max_model_len):
            return out, "length"


def random_requests(num, seed=0, max_prompt=120):
    rng = random.Random(seed)
    pool = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))] for _ in range(15)]
    requests, seeds = [], {}
    for i in range(num):
        if rng.random() < 0.3:
            prompt = list(rng.choice(pool))  # a prompt that comes back in a later group
        else:
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))]
        params = SamplingParams(n=rng.choice([1, 1, 2, 4]), max_tokens=rng.randint(1, 48),
                                stop_token_ids=(7,) if rng.random() < 0.2 else ())
        requests.append(Request(prompt, params, group_id=f"g{i}", request_id=f"r{i}"))
        if rng.random() < 0.5:
            seeds[f"r{i}"] = i  # sampled: the group's samples differ; otherwise greedy, all equal
    return requests, seeds


def check_inputs(batch, inp, block_size):
    """The packed tensors agree with the sequences, their block tables and the step's entries."""
    assert inp.input_ids.dtype == torch.int64 and inp.positions.dtype == torch.int64
    assert inp.cu_seqlens_q.dtype == torch.int32 and inp.seq_lens.dtype == torch.int32
    assert inp.block_tables.dtype == torch.int32 and inp.slot_mapping.dtype == torch.int64
    cu, lens = inp.cu_seqlens_q.tolist(), inp.seq_lens.tolist()
    assert cu[0] == 0 and len(cu) == len(batch.entries) + 1 and cu[-1] == batch.num_tokens
    assert inp.max_q_len == max(e.num_new for e in batch.entries)
    sample_rows = []
    for s, e in enumerate(batch.entries):
        seq = e.seq
        assert e.start == seq.num_cached_tokens and cu[s + 1] - cu[s] == e.num_new
        assert lens[s] == seq.num_cached_tokens + e.num_new <= seq.num_tokens
        assert e.samples == (lens[s] == seq.num_tokens)
        table = inp.block_tables[s].tolist()
        n_blocks = len(seq.block_table)
        assert table[:n_blocks] == seq.block_table and all(b == -1 for b in table[n_blocks:])
        assert n_blocks * block_size >= lens[s]
        pos = list(range(e.start, e.start + e.num_new))
        assert inp.positions[cu[s] : cu[s + 1]].tolist() == pos
        assert inp.input_ids[cu[s] : cu[s + 1]].tolist() == seq.token_ids[e.start : e.start + e.num_new]
        slots = [seq.block_table[p // block_size] * block_size + p % block_size for p in pos]
        assert inp.slot_mapping[cu[s] : cu[s + 1]].tolist() == slots
        if e.samples:
            sample_rows.append(cu[s + 1] - 1)
    assert inp.sample_indices.tolist() == sample_rows
    written = inp.slot_mapping.tolist()
    assert len(set(written)) == len(written)  # no two tokens of a step write the same slot


def check_blocks(sched, batch):
    bm = sched.block_manager
    counts = Counter(b for s in sched.running for b in s.block_table)
    assert all(bm.ref_counts[b] == counts[b] for b in range(bm.num_blocks))
    assert all(bm.is_free(b) == (counts[b] == 0) for b in range(bm.num_blocks))
    assert all(not s.block_table and s.num_cached_tokens == 0 for s in batch.preempted)
    assert all(s.status is SequenceStatus.WAITING for s in batch.preempted)
    # A shared block is full of tokens every holder has computed by the end of this step.
    after = {id(e.seq): e.start + e.num_new for e in batch.entries}
    holders = {}
    for s in sched.running:
        done = after.get(id(s), s.num_cached_tokens)
        for j, b in enumerate(s.block_table):
            holders.setdefault(b, []).append((s, j, done))
    for b, hs in holders.items():
        if len(hs) > 1:
            assert len({j for _, j, _ in hs}) == 1  # same place in every chain
            assert all((j + 1) * bm.block_size <= done for _, j, done in hs)


def simulate(requests, seeds, *, num_blocks, block_size=8, max_num_seqs=12, max_num_batched_tokens=64,
             chunk_size=24, prefix_caching=True, max_model_len=None, checks=True):
    """Run the scheduler to completion against the stand-in model reading a simulated paged cache."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens, chunk_size, eos_token_ids=[EOS],
                      max_model_len=max_model_len)
    seqs = [s for r in requests for s in Sequence.from_request(r)]
    sched.add(seqs)
    tok_cache = [-1] * (num_blocks * block_size)
    pos_cache = [-1] * (num_blocks * block_size)
    stats = Counter()
    finished = []
    while sched.has_work():
        batch = sched.schedule()
        assert batch.entries, "a step with work must schedule something"
        assert batch.num_tokens <= max_num_batched_tokens
        assert len(batch) <= max_num_seqs and len(sched.running) <= max_num_seqs
        assert len({id(e.seq) for e in batch.entries}) == len(batch)
        assert all(e.num_new <= chunk_size for e in batch.entries)
        inp = batch.build_inputs()
        if checks:
            check_inputs(batch, inp, block_size)
            check_blocks(sched, batch)
        stats["steps"] += 1
        stats["computed_tokens"] += batch.num_tokens
        stats["preempted"] += len(batch.preempted)
        stats["peak_used_blocks"] = max(stats["peak_used_blocks"], bm.num_used_blocks)
        stats["max_running"] = max(stats["max_running"], len(sched.running))
        stats["partial_prefill_chunks"] += sum(1 for e in batch.entries if not e.samples)
        # The model: store the step's K/V (here: token and position) first, then read the contexts.
        for slot, tok, pos in zip(inp.slot_mapping.tolist(), inp.input_ids.tolist(), inp.positions.tolist()):
            tok_cache[slot], pos_cache[slot] = tok, pos
        tokens, logprobs = [], []
        tables, lens = inp.block_tables.tolist(), inp.seq_lens.tolist()
        for s in (i for i, e in enumerate(batch.entries) if e.samples):
            seq = batch.entries[s].seq
            slots = [tables[s][p // block_size] * block_size + p % block_size for p in range(lens[s])]
            assert [pos_cache[x] for x in slots] == list(range(lens[s]))
            context = [tok_cache[x] for x in slots]
            assert context == seq.token_ids  # the paged cache holds exactly this sequence
            t = next_token(context, _salt(seq, seeds))
            tokens.append(t)
            logprobs.append(-t / VOCAB)
        finished += sched.postprocess(batch, tokens, logprobs)
    assert len(finished) == len(seqs) and all(s.is_finished for s in seqs)
    assert bm.num_free_blocks == num_blocks and all(r == 0 for r in bm.ref_counts)  # no leak
    stats["hit_tokens"] = bm.num_hit_tokens
    stats["preemptions"] = sched.num_preemptions
    results = {(s.request_id, s.sample_index): (s.output_ids, s.finish_reason) for s in seqs}
    for s in seqs:
        assert s.output_logprobs == [-t / VOCAB for t in s.output_ids]
        assert s.first_token_time is not None and s.finish_time >= s.first_token_time >= s.arrival_time
    return results, stats


def test_small_cache_preempts_and_matches_unlimited_cache_and_the_oracle():
    requests, seeds = random_requests(1000)
    max_model_len = 150
    oracle = {}
    for r in requests:
        for i in range(r.params.n):
            salt = 0 if r.request_id not in seeds else (seeds[r.request_id], i)
            oracle[(r.request_id, i)] = expected_output(r.prompt_ids, r.params, salt, max_model_len)
    assert Counter(reason for _, reason in oracle.values()).keys() == {"stop", "length"}

    small, small_stats = simulate(requests, seeds, num_blocks=40, max_model_len=max_model_len)
    big, big_stats = simulate(requests, seeds, num_blocks=4000, max_num_seqs=64, max_model_len=max_model_len,
                              checks=False)
    assert big_stats["preemptions"] == 0
    assert small_stats["preemptions"] > 20 and small_stats["preempted"] == small_stats["preemptions"]
    assert small_stats["partial_prefill_chunks"] > 0  # long prompts were split into chunks
    assert small_stats["max_running"] == 12  # the sequence limit binds (and is never exceeded)
    assert small == big == oracle


def _blocks_to_admit_all(requests, prefix_caching):
    bm = BlockManager(20000, 8, enable_prefix_caching=prefix_caching)
    sched = Scheduler(bm, max_num_seqs=10000, max_num_batched_tokens=10**6)
    sched.add([s for r in requests for s in Sequence.from_request(r)])
    batch = sched.schedule()
    assert sched.num_waiting == 0
    return bm.num_used_blocks, batch.num_tokens


def test_prefix_sharing_gives_the_same_outputs_with_fewer_blocks_and_tokens():
    requests, seeds = random_requests(300, seed=1)
    on, on_stats = simulate(requests, seeds, num_blocks=3000, max_num_seqs=64, checks=False)
    off, off_stats = simulate(requests, seeds, num_blocks=3000, max_num_seqs=64, prefix_caching=False,
                              checks=False)
    assert on == off
    assert off_stats["hit_tokens"] == 0 and on_stats["hit_tokens"] > 0
    assert on_stats["computed_tokens"] < off_stats["computed_tokens"]
    blocks_on, tokens_on = _blocks_to_admit_all(requests, True)
    blocks_off, tokens_off = _blocks_to_admit_all(requests, False)
    assert blocks_on < 0.8 * blocks_off and tokens_on < 0.8 * tokens_off
    # Sharing also holds up under memory pressure.
    small_on, _ = simulate(requests, seeds, num_blocks=40, prefix_caching=True)
    small_off, _ = simulate(requests, seeds, num_blocks=40, prefix_caching=False)
    assert small_on == small_off == on


def test_a_group_prefills_its_prompt_once():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    group = Sequence.from_request(Request(list(range(1, 11)), SamplingParams(n=4), "g", "r"))
    sched.add(group)
    batch = sched.schedule()
    assert [(e.seq, e.start, e.num_new, e.samples) for e in batch.entries] == [
        (group[0], 0, 10, True), *[(s, 8, 2, True) for s in group[1:]]]
    shared = group[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in group) and [bm.ref_counts[b] for b in shared] == [4, 4]
    assert len({s.block_table[2] for s in group}) == 4  # the partial block of each sample is its own
    inp = batch.build_inputs()
    assert inp.seq_lens.tolist() == [10] * 4 and inp.cu_seqlens_q.tolist() == [0, 10, 12, 14, 16]
    assert inp.sample_indices.tolist() == [9, 11, 13, 15] and inp.max_q_len == 10
    sched.postprocess(batch, [5, 6, 7, 8], [-0.1] * 4)
    assert [s.output_ids for s in group] == [[5], [6], [7], [8]]
    assert all(s.num_cached_tokens == 10 and not s.is_prefilling for s in group)
    with pytest.raises(RuntimeError, match="after postprocess"):
        batch.build_inputs()
    with pytest.raises(RuntimeError, match="already postprocessed"):
        sched.postprocess(batch, [1, 2, 3, 4])
    batch = sched.schedule()
    assert [(e.start, e.num_new, e.samples) for e in batch.entries] == [(10, 1, True)] * 4
    with pytest.raises(ValueError, match="expected 4 sampled tokens"):
        sched.postprocess(batch, [1, 2])


def test_chunked_prefill_splits_a_long_prompt_and_decodes_go_first():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=20, chunk_size=16)
    short = Sequence([1, 2, 3], SamplingParams(max_tokens=10), request_id="short")
    sched.add(short)
    sched.postprocess(sched.schedule(), [9])
    long = Sequence(list(range(50)), SamplingParams(max_tokens=2), request_id="long")
    sched.add(long)
    chunks = []
    for _ in range(4):
        batch = sched.schedule()
        assert batch.entries[0].seq is short and batch.entries[0].num_new == 1  # the decode first
        e = batch.entries[1]
        chunks.append((e.start, e.num_new, e.samples))
        sched.postprocess(batch, [4] * len(batch.sampling))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert long.output_ids == [4] and long.num_cached_tokens == 50


def test_token_budget_caps_a_step_and_chunks():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10, chunk_size=6)
    seqs = [Sequence(list(range(100 * i, 100 * i + 7)), SamplingParams(max_tokens=1)) for i in range(3)]
    sched.add(seqs)
    batch = sched.schedule()
    assert [(e.seq, e.num_new) for e in batch.entries] == [(seqs[0], 6), (seqs[1], 4)]
    assert sched.num_waiting == 1 and sched.num_running == 2


def test_preempted_sequence_keeps_its_tokens_and_goes_back_first():
    bm = BlockManager(4, 4)  # 16 slots
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    old = Sequence(list(range(1, 8)), SamplingParams(max_tokens=20), request_id="old")
    new = Sequence(list(range(11, 18)), SamplingParams(max_tokens=20), request_id="new")
    waiting = Sequence([30], SamplingParams(max_tokens=20), request_id="waiting")
    sched.add([old, new, waiting])
    batch = sched.schedule()  # old and new take 2 blocks each; waiting does not fit
    assert [e.seq for e in batch.entries] == [old, new] and sched.waiting[0] is waiting
    sched.postprocess(batch, [40, 41])
    batch = sched.schedule()  # both have 8 tokens: the last ones fit their blocks
    sched.postprocess(batch, [42, 43])
    batch = sched.schedule()  # old needs a third block: new is preempted
    assert batch.preempted == [new] and [e.seq for e in batch.entries] == [old]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_cached_tokens == 0
    assert new.output_ids == [41, 43] and new.num_preemptions == 1
    assert list(sched.waiting) == [new, waiting]
    sched.postprocess(batch, [44])
    assert old.output_ids == [40, 42, 44] and len(old.block_table) == 3
    batch = sched.schedule()  # new does not fit back while old holds 3 of the 4 blocks
    assert [e.seq for e in batch.entries] == [old] and not batch.preempted
    assert list(sched.waiting) == [new, waiting]


def test_readmitted_sequence_recomputes_prompt_and_generated_tokens():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=[EOS])
    old = Sequence(list(range(1, 8)), SamplingParams(max_tokens=3), request_id="old")
    new = Sequence(list(range(11, 18)), SamplingParams(max_tokens=5), request_id="new")
    sched.add([old, new])
    for toks in ([40, 41], [42, 43]):
        sched.postprocess(sched.schedule(), toks)
    batch = sched.schedule()
    assert batch.preempted == [new]
    done = sched.postprocess(batch, [44])
    assert done == [old] and old.finish_reason == "length" and old.output_ids == [40, 42, 44]
    batch = sched.schedule()  # new is readmitted with its 9 tokens (7 prompt + 2 generated)
    (e,) = batch.entries
    # Its first block is still cached (the tail is evicted first): 5 tokens are computed again.
    assert e.seq is new and e.start == 4 and e.num_new == 5 and e.samples
    inp = batch.build_inputs()
    assert inp.input_ids.tolist() == [15, 16, 17, 41, 43] and inp.seq_lens.tolist() == [9]
    sched.postprocess(batch, [EOS])
    assert new.finish_reason == "stop" and new.output_ids == [41, 43, EOS]
    assert not sched.has_work() and bm.num_free_blocks == 4


def test_stop_tokens_max_tokens_and_max_model_len():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, 8, 64, eos_token_ids=[2], max_model_len=6)
    a = Sequence([1, 1], SamplingParams(max_tokens=10, stop_token_ids=(9,)), request_id="a")
    b = Sequence([1, 1, 1], SamplingParams(max_tokens=10), request_id="b")
    c = Sequence([3], SamplingParams(max_tokens=2), request_id="c")
    d = Sequence([4], SamplingParams(max_tokens=10), request_id="d")
    sched.add([a, b, c, d])
    out = {}
    for toks in ([5, 2, 5, 5], [9, 5, 5], [5]):
        for s in sched.postprocess(sched.schedule(), toks):
            out[s.request_id] = (s.output_ids, s.finish_reason)
    assert out == {"b": ([2], "stop"), "a": ([5, 9], "stop"), "c": ([5, 5], "length")}
    while sched.has_work():
        batch = sched.schedule()
        sched.postprocess(batch, [5] * len(batch.sampling))
    assert d.output_ids == [5] * 5 and d.finish_reason == "length" and d.num_tokens == 6  # max_model_len
    assert bm.num_free_blocks == 16


def test_too_long_prompt_is_rejected_at_add():
    sched = Scheduler(BlockManager(16, 4), 8, 64, max_model_len=32)
    ok = Sequence(list(range(31)), request_id="fits")
    sched.add(ok)
    with pytest.raises(ValueError, match=r"'too-long'.*40 tokens.*longer than max_model_len=32"):
        sched.add(Sequence(list(range(40)), request_id="too-long"))
    with pytest.raises(ValueError, match="as long as max_model_len=32"):
        sched.add(Sequence(list(range(32)), request_id="equal"))
    small = Scheduler(BlockManager(4, 4), 8, 64)
    with pytest.raises(ValueError, match=r"'huge'.*17 tokens can never fit.*4 blocks x 4 = 16 tokens"):
        small.add(Sequence(list(range(17)), request_id="huge"))
    assert sched.num_waiting == 1 and small.num_waiting == 0


def test_sequence_that_outgrows_the_whole_cache_raises_instead_of_deadlocking():
    bm = BlockManager(3, 4)  # 12 slots
    sched = Scheduler(bm, 4, 64)
    seq = Sequence(list(range(10)), SamplingParams(max_tokens=50), request_id="grower")
    sched.add(seq)
    with pytest.raises(RuntimeError, match=r"'grower'.*13 tokens.*10 prompt \+ 3 generated.*3 blocks x 4 = 12"):
        while sched.has_work():
            batch = sched.schedule()
            sched.postprocess(batch, [1] * len(batch.sampling))
    # Behind another sequence: it waits for the cache, then fails the same way once alone.
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, 4, 64)
    first = Sequence([1], SamplingParams(max_tokens=5), request_id="first")
    grower = Sequence(list(range(10)), SamplingParams(max_tokens=50), request_id="grower")
    sched.add([first, grower])
    with pytest.raises(RuntimeError, match="'grower'.*more than the whole KV cache"):
        for _ in range(100):
            batch = sched.schedule()
            sched.postprocess(batch, [1] * len(batch.sampling))
