"""Decode steps through the CUDA-graph buffers (padded buckets, scratch block), run eagerly on CPU."""

from collections import Counter

import torch

from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.cuda_graph import default_buckets
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.types import Request, SamplingParams

PROMPTS = ["Start with 7. Add 5.", "What is 3 + 4?", "x", "A much longer prompt that spans several cache blocks."]


def _engine(model, tok, static: bool, sink=None, **kw):
    engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(**kw), feature_sink=sink)
    if static:
        engine.runner.use_static_decode()
    return engine


def _requests(tok, params):
    return [Request(tok(p, add_special_tokens=False)["input_ids"], params, f"g{i}", f"r{i}")
            for i, p in enumerate(PROMPTS)]


def test_buckets_cover_every_batch_size_with_little_padding():
    b = default_buckets(256)
    assert b[:5] == [1, 2, 4, 8, 16] and b[-1] == 256 and b == sorted(set(b))
    for n in range(1, 257):
        bucket = next(x for x in b if x >= n)
        assert bucket < 2 * n or n == 1  # fewer padded rows than real ones
        assert bucket - n < 32
    assert default_buckets(5)[-1] == 8 and default_buckets(1) == [1]


def test_padded_static_decode_equals_the_eager_engine(tiny_model):
    model, tok = tiny_model
    # 4 prompts x n=3: 12 decoding sequences, padded to bucket 16; finishing ones shrink the bucket.
    for params in (SamplingParams(n=3, temperature=0.0, max_tokens=30),
                   SamplingParams(n=3, temperature=0.9, max_tokens=30, seed=5)):
        kw = dict(block_size=4, num_blocks=200, max_model_len=128, decode_steps=1)
        static_engine = _engine(model, tok, True, **kw)
        static = static_engine.generate(_requests(tok, params))
        eager = _engine(model, tok, False, **kw).generate(_requests(tok, params))
        assert [c.tokens for c in static] == [c.tokens for c in eager]
        for a, b in zip(static, eager):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert static_engine.runner.graphs.graphs  # decode steps did go through the buckets
        assert static_engine.block_manager.num_free_blocks == 200  # the scratch block is not the manager's


def test_padding_rows_write_only_the_scratch_block(tiny_model):
    model, tok = tiny_model
    engine = _engine(model, tok, True, block_size=4, num_blocks=64, max_model_len=64)
    k_cache = engine.runner.kv_caches[0][0]
    assert k_cache.shape[0] == 65  # the manager's 64 blocks + scratch
    k_cache[64] = 123.0
    engine.generate(_requests(tok, SamplingParams(n=1, temperature=0.0, max_tokens=8))[:3])  # 3 rows -> bucket 4
    assert (k_cache[64, 0] != 123.0).all()  # a padding row wrote its K/V at the scratch block's slot 0


def test_features_through_the_static_path_equal_eager_ones(tiny_model):
    model, tok = tiny_model
    got = {True: {}, False: {}}
    for static in (True, False):
        def sink(f, out=got[static]):
            for r in range(len(f.positions)):
                key = (f.seq_keys[int(f.owner[r])], int(f.positions[r]))
                out[key] = (int(f.token_ids[r]), f.hidden[-1][r].clone())
        engine = _engine(model, tok, static, sink, block_size=4, num_blocks=128, max_model_len=64)
        calls = []
        original = engine.runner.launch_decode_steps
        engine.runner.launch_decode_steps = lambda seqs, k, chained=False: calls.append(chained) or original(
            seqs, k, chained)
        engine.generate(_requests(tok, SamplingParams(n=2, temperature=0.0, max_tokens=10)))
        assert bool(calls) == static  # the static path ran several steps per replay, features captured
    # the same (sequence, position) keys: no feature of a draw discarded past a sequence's end
    assert got[True].keys() == got[False].keys()
    for key, (token, h) in got[False].items():
        assert got[True][key][0] == token
        torch.testing.assert_close(got[True][key][1], h, atol=1e-5, rtol=1e-5)


def test_several_decode_steps_per_replay_equal_single_steps(tiny_model):
    model, tok = tiny_model
    # max_tokens 10 is not a multiple of 4 steps: the draws past it are discarded; n=3 x 4 prompts
    # finish at different steps (stop tokens included), and a 4-token block size makes the
    # replays cross block boundaries with slots taken ahead.
    params = SamplingParams(n=3, temperature=0.0, max_tokens=10)
    kw = dict(block_size=4, num_blocks=120, max_model_len=96)
    multi = _engine(model, tok, True, **kw, decode_steps=4)
    single = _engine(model, tok, False, **kw, decode_steps=1)
    calls = []
    original = multi.runner.launch_decode_steps
    multi.runner.launch_decode_steps = lambda seqs, k, chained=False: calls.append((k, chained)) or original(
        seqs, k, chained)
    a = multi.generate(_requests(tok, params))
    b = single.generate(_requests(tok, params))
    assert calls and {k for k, _ in calls} == {4}  # the decode phase did run several steps per replay
    # replays were chained on the device (launched before the previous one was read), not all
    assert 0 < sum(chained for _, chained in calls) < len(calls)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    assert all(len(c.tokens) <= 10 for c in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    assert multi.block_manager.num_free_blocks == 120  # slots taken ahead were all given back
    assert multi.stats["steps"] == single.stats["steps"]
    # the blocks filled during the replays are registered for prefix sharing as single steps register them
    assert set(multi.block_manager.hash_to_block) == set(single.block_manager.hash_to_block)
    assert len(multi.block_manager.hash_to_block) > 10


def test_several_decode_steps_wait_for_waiting_sequences(tiny_model):
    model, tok = tiny_model
    # room for 2 sequences at a time: the others wait, so steps stay single until the queue drains
    engine = _engine(model, tok, True, block_size=4, num_blocks=200, max_model_len=96, max_num_seqs=2,
                     decode_steps=4)
    seen = []
    original = engine.runner.launch_decode_steps
    engine.runner.launch_decode_steps = lambda seqs, k, chained=False: seen.append(
        engine.scheduler.num_waiting) or original(seqs, k, chained)
    engine.generate(_requests(tok, SamplingParams(n=1, temperature=0.0, max_tokens=12)))
    assert seen and all(w == 0 for w in seen)


def test_chained_replays_are_reproducible_when_sampling(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.9, max_tokens=20, seed=3)
    kw = dict(block_size=4, num_blocks=120, max_model_len=96, decode_steps=4)
    runs = [_engine(model, tok, True, **kw).generate(_requests(tok, params)) for _ in range(2)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    assert [c.logprobs for c in runs[0]] == [c.logprobs for c in runs[1]]
    assert len({tuple(c.tokens) for c in runs[0]}) > 1  # it did sample


def test_replays_chain_only_where_the_speculator_will_not_draft(tiny_model):
    from slipstream.rollout.spec.policy import PolicyConfig
    from slipstream.rollout.spec.speculator import SpecConfig

    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=24)
    plain = _engine(model, tok, False, block_size=4, num_blocks=200, max_model_len=96).generate(_requests(tok, params))
    # 8 live sequences: above min_batch_for_off (2) nothing drafts; below it (64) the bandit's arm
    # decides: arm 0 (the only one with draft_lens=(0,)) drafts nothing, arm 2 may draft
    for min_batch_for_off, lens, forced_arm, expect_chained in ((2, (0, 2), None, True), (64, (0,), None, True),
                                                                (64, (0, 2), 2, False)):
        engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id],
                        EngineConfig(block_size=4, num_blocks=200, max_model_len=96, decode_steps=4),
                        spec=SpecConfig(policy=PolicyConfig(min_batch_for_off=min_batch_for_off, draft_lens=lens)))
        engine.runner.use_static_decode()
        if forced_arm is not None:
            engine.speculator.policy.choose_arm = lambda live, arm=forced_arm: arm
        calls = []
        original = engine.runner.launch_decode_steps
        engine.runner.launch_decode_steps = lambda seqs, k, chained=False: calls.append(chained) or original(
            seqs, k, chained)
        out = engine.generate(_requests(tok, params))
        assert any(calls) == expect_chained, (min_batch_for_off, lens, forced_arm)
        assert [c.tokens for c in out] == [c.tokens for c in plain]
        if min_batch_for_off == 64 and forced_arm is None:  # the chained steps count for arm 0
            assert engine.speculator.policy.stats(8)[0][0] > 0


def test_chained_replays_under_a_small_cache_preempt_without_changing_outputs(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=3, temperature=0.0, max_tokens=48)
    big = _engine(model, tok, False, block_size=4, num_blocks=512).generate(_requests(tok, params))
    small_engine = _engine(model, tok, True, block_size=4, num_blocks=40, max_num_batched_tokens=64, chunk_size=16,
                           decode_steps=4)
    calls = []
    original = small_engine.runner.launch_decode_steps
    small_engine.runner.launch_decode_steps = lambda seqs, k, chained=False: calls.append(chained) or original(
        seqs, k, chained)
    small = small_engine.generate(_requests(tok, params))
    assert small_engine.stats["preemptions"] > 0 and any(calls)  # both happened in the one run
    assert [c.tokens for c in small] == [c.tokens for c in big]
    for a, b in zip(small, big):  # log-probs depend on the whole cached context
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert small_engine.block_manager.num_free_blocks == 40


def test_random_requests_through_chained_replays_match_single_eager_steps(tiny_model):
    # Random prompts, lengths and stop tokens, a cache small enough to preempt, prefix sharing:
    # chained multi-step replays must give the single-step eager engine's outputs, leak nothing.
    model, tok = tiny_model
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    requests = []
    for i in range(40):
        prompt = torch.randint(3, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        stop = torch.randint(3, vocab, (3,), generator=g).tolist()
        params = SamplingParams(n=int(torch.randint(1, 4, (1,), generator=g)), temperature=0.0,
                                max_tokens=int(torch.randint(1, 40, (1,), generator=g)), stop_token_ids=stop)
        requests.append(Request(prompt, params, f"g{i % 13}", f"r{i}"))
    kw = dict(block_size=4, num_blocks=60, max_model_len=72, max_num_batched_tokens=96, chunk_size=24)
    eager = _engine(model, tok, False, **kw, decode_steps=1).generate(requests)
    engine = _engine(model, tok, True, **kw, decode_steps=4)
    calls = []
    original = engine.runner.launch_decode_steps
    engine.runner.launch_decode_steps = lambda seqs, k, chained=False: calls.append(chained) or original(
        seqs, k, chained)
    chained = engine.generate(requests)
    assert any(calls) and engine.stats["preemptions"] > 0
    assert [c.tokens for c in chained] == [c.tokens for c in eager]
    for a, b in zip(chained, eager):  # log-probs depend on the whole cached context
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert [c.finish_reason for c in chained] == [c.finish_reason for c in eager]
    assert {c.finish_reason for c in eager} == {"stop", "length"}
    assert engine.block_manager.num_free_blocks == 60


def test_a_weight_load_first_reads_the_replay_in_flight(tiny_model):
    from slipstream.rollout.sequence import Sequence

    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=30)
    kw = dict(block_size=4, num_blocks=120, max_model_len=96, decode_steps=4)
    plain = _engine(model, tok, False, **kw).generate(_requests(tok, params))
    engine = _engine(model, tok, True, **kw)
    seqs = [s for r in _requests(tok, params) for s in Sequence.from_request(r)]
    engine.scheduler.add(seqs)
    while engine._inflight is None:  # step by hand until a chained replay is in flight
        engine.step()
    # the same weights again: nothing may change, but the draws in flight are read first
    engine.load_weights((n, p) for n, p in model.named_parameters())
    assert engine._inflight is None and all(s.num_output_tokens > 0 for s in seqs)
    while engine.scheduler.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == [c.tokens for c in plain]
    for s, c in zip(seqs, plain):  # log-probs depend on the whole cached context
        torch.testing.assert_close(torch.tensor(s.output_logprobs), torch.tensor(c.logprobs), atol=1e-5, rtol=0)
    assert engine.block_manager.num_free_blocks == 120


def test_rollout_metrics_count_the_buckets_made_during_that_rollout(tiny_model):
    model, tok = tiny_model
    engine = _engine(model, tok, True, block_size=4, num_blocks=200, max_model_len=128)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=12)
    engine.generate(_requests(tok, params))
    first = engine.rollout_metrics()
    made = len(engine.runner.graphs.graphs)
    assert made and first["rollout/graphs_captured"] == made
    assert first["rollout/slowest_step_s"] == max(s.seconds for s in engine.timeline.steps)
    engine.generate(_requests(tok, params))  # the same batch sizes: every bucket is there already
    assert engine.rollout_metrics()["rollout/graphs_captured"] == 0


def test_graphs_captured_at_start_leave_nothing_for_the_rollouts(tiny_model):
    from slipstream.rollout.spec.speculator import SpecConfig
    from slipstream.rollout.spec.verify_graphs import QUERY_WIDTHS

    model, tok = tiny_model
    engine = _engine(model, tok, True, block_size=4, num_blocks=400, max_model_len=128, max_num_seqs=24)
    engine.capture_graphs()
    buckets = default_buckets(24)
    assert engine.stats["graphs_at_start"] == 2 * len(buckets)
    # the default path replays 4 steps at a time; single steps while prompts wait
    assert set(engine.runner.graphs.graphs) == {(b, s) for b in buckets for s in (1, 4)}
    for params in (SamplingParams(n=6, temperature=1.0, max_tokens=40, seed=1),
                   SamplingParams(n=2, temperature=0.0, max_tokens=9)):  # 4 x 6 = 24 draining, then 8
        engine.generate(_requests(tok, params))
        assert engine.rollout_metrics()["rollout/graphs_captured"] == 0
    # prompts waiting for a free slot (8 of 24 run at once) or for free blocks: single steps
    for seqs, blocks in ((8, 400), (24, 60)):
        waiting = _engine(model, tok, True, block_size=4, num_blocks=blocks, max_model_len=128, max_num_seqs=seqs)
        waiting.capture_graphs()
        waiting.generate(_requests(tok, SamplingParams(n=6, temperature=1.0, max_tokens=40, seed=1)))
        assert waiting.rollout_metrics()["rollout/graphs_captured"] == 0
    one_step = _engine(model, tok, True, block_size=4, num_blocks=400, max_model_len=128, max_num_seqs=24,
                       decode_steps=8)  # more steps than a block holds: decoding replays one step at a time
    one_step.capture_graphs()
    assert set(one_step.runner.graphs.graphs) == {(b, 1) for b in buckets}
    one_step.generate(_requests(tok, SamplingParams(n=6, temperature=1.0, max_tokens=20, seed=2)))
    assert one_step.rollout_metrics()["rollout/graphs_captured"] == 0
    speculating = Engine(decoder_from_hf_module(model), [tok.eos_token_id],
                         EngineConfig(block_size=4, num_blocks=400, max_model_len=128), spec=SpecConfig())
    speculating.runner.use_static_decode()
    speculating.spec_runner.use_static_verify()
    speculating.capture_graphs()
    verify = speculating.spec_runner.graphs
    assert set(verify.graphs) == {(b, q) for b in verify.buckets for q in QUERY_WIDTHS}


def test_features_of_several_decode_steps_per_replay_equal_single_steps(tiny_model):
    # A replay of 4 steps hands its rows in one StepFeatures; every (sequence, position) must carry
    # the token and hidden state that single eager steps hand over, finished sequences no more rows.
    model, tok = tiny_model
    params = SamplingParams(n=3, temperature=0.0, max_tokens=23)
    kw = dict(block_size=4, num_blocks=200, max_model_len=128)

    def captured(static, steps):
        calls = []
        engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(**kw, decode_steps=steps),
                        capture_layers=(0, -1), feature_sink=calls.append)
        if static:
            engine.runner.use_static_decode()
        comps = engine.generate(_requests(tok, params))
        seen = {}
        for f in calls:
            for r in range(f.token_ids.shape[0]):
                key = (f.seq_keys[int(f.owner[r])], int(f.positions[r]))
                assert key not in seen
                seen[key] = (int(f.token_ids[r]), f.hidden[0][r], f.hidden[-1][r])
        return comps, seen, calls

    single_comps, single, _ = captured(False, 1)
    multi_comps, multi, calls = captured(True, 4)
    assert [c.tokens for c in multi_comps] == [c.tokens for c in single_comps]
    shortest_prompt = min(len(c.prompt_ids) for c in multi_comps)
    decode_calls = [f for f in calls if int(f.positions.min()) >= shortest_prompt]
    # The decode rows wait in the ring until the rollout's end (nothing read them before, and no
    # kernel runs between the replays to gather them): one call carries every replay's rows.
    assert len(decode_calls) == 1 and max(Counter(decode_calls[0].owner.tolist()).values()) > 4
    assert set(multi) == set(single)
    for key, (token, h0, h_last) in single.items():
        assert multi[key][0] == token, key
        torch.testing.assert_close(multi[key][1], h0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(multi[key][2], h_last, atol=1e-5, rtol=1e-4)


def test_features_survive_the_feature_ring_wrapping_around(tiny_model, monkeypatch):
    # The smallest ring (two replays of the largest bucket): chained replays overwrite it many
    # times over, so queued rows must be gathered before a replay would overwrite them.
    import slipstream.rollout.cuda_graph as cuda_graph

    monkeypatch.setattr(cuda_graph, "FEATURE_RING_BYTES", 0)
    model, tok = tiny_model
    params = SamplingParams(n=3, temperature=0.0, max_tokens=30)
    kw = dict(block_size=4, num_blocks=200, max_model_len=128, max_num_seqs=12)

    def captured(static, steps):
        seen, calls = {}, []

        def sink(f):
            calls.append(f.token_ids.shape[0])
            for r in range(f.token_ids.shape[0]):
                key = (f.seq_keys[int(f.owner[r])], int(f.positions[r]))
                assert key not in seen
                seen[key] = (int(f.token_ids[r]), f.hidden[-1][r].clone())

        engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(**kw, decode_steps=steps),
                        capture_layers=(-1,), feature_sink=sink)
        if static:
            engine.runner.use_static_decode()
        comps = engine.generate(_requests(tok, params))
        return comps, seen, engine.runner.graphs

    single_comps, single, _ = captured(False, 1)
    multi_comps, multi, graphs = captured(True, 4)
    assert graphs.ring_size == 2 * 4 * 16  # block size 4, largest bucket 16
    assert graphs.ring_written > 3 * graphs.ring_size  # wrapped around several times
    assert [c.tokens for c in multi_comps] == [c.tokens for c in single_comps]
    assert set(multi) == set(single)
    for key, (token, h) in single.items():
        assert multi[key][0] == token, key
        torch.testing.assert_close(multi[key][1], h, atol=1e-5, rtol=1e-4)
