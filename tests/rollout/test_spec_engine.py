"""Speculative decoding in the engine is lossless: same distribution of sequences, same greedy
outputs token for token, same log-probs, and the paged cache rolled back to plain decoding's."""

import dataclasses
import random
from collections import Counter

import pytest
import torch

from slipstream.models.decoder import AttentionMetadata, Decoder, DecoderConfig
from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.sampler import shape_logits
from slipstream.rollout.sequence import Sequence
from slipstream.rollout.spec.policy import PolicyConfig
from slipstream.rollout.spec.speculator import SpecConfig, Speculator
from slipstream.rollout.types import Request, SamplingParams

from tests.chi_square import chi_square_p

SMALL_VOCAB = 4
EOS = 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared CPU run far faster on one thread than fighting over several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_decoder(seed: int = 0) -> Decoder:
    """A random 2-layer decoder over 4 tokens: sequences of a few tokens have few outcomes."""
    cfg = DecoderConfig(model_type="llama", vocab_size=SMALL_VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, intermediate_size=64)
    dec = Decoder(cfg, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else 0.3 * torch.randn(p.shape, generator=g))
    return dec


class ScriptedSpeculator(Speculator):
    """Drafts chosen by a function of the sequence (random, right or wrong), whatever the batch."""

    def __init__(self, draft_fn):
        super().__init__(SpecConfig())
        self.draft_fn = draft_fn

    def propose(self, scheduler):
        return {s.seq_id: self.draft_fn(s) for s in scheduler.running if not s.is_prefilling}


def random_drafts(seed: int):
    rng = random.Random(seed)
    return lambda seq: [rng.randrange(SMALL_VOCAB) for _ in range(rng.randint(0, 4))]


PROMPTS_SMALL = ([1, 2, 3, 1], [2, 3])


def _sample_sequences(engine: Engine, params: SamplingParams) -> Counter:
    reqs = [Request(p, params, f"g{i}", f"r{i}") for i, p in enumerate(PROMPTS_SMALL)]
    return Counter((tuple(c.prompt_ids), tuple(c.tokens)) for c in engine.generate(reqs))


def _exact_distribution(dec: Decoder, params: SamplingParams) -> tuple[dict[tuple, float], dict[tuple, list]]:
    """Probability of every possible (prompt, output) under plain sampling, by enumeration, and
    the sampling distribution after every (prompt, unfinished output prefix)."""
    out, after = {}, {}
    for prompt in PROMPTS_SMALL:
        frontier = [((), 1.0)]
        while frontier:
            prefix, prob = frontier.pop()
            tokens = list(prompt) + list(prefix)
            n = len(tokens)
            with torch.inference_mode():
                hidden = dec(torch.tensor(tokens), torch.arange(n), AttentionMetadata.build([n], [n], [[0]], n),
                             dec.allocate_kv_cache(1, n))
                logits = dec.compute_logits(hidden[-1:])
            probs = shape_logits(logits, torch.tensor([params.temperature]), torch.tensor([params.top_p]),
                                 torch.tensor([params.top_k])).softmax(-1)[0].tolist()
            after[(tuple(prompt), prefix)] = probs
            for t, p in enumerate(probs):
                if p == 0.0:
                    continue
                seq = prefix + (t,)
                if t == EOS or len(seq) == params.max_tokens:
                    out[(tuple(prompt), seq)] = prob * p
                else:
                    frontier.append((seq, prob * p))
    return out, after


def plausible_drafts(after: dict[tuple, list], seed: int):
    """Mostly the most likely continuation (drafts a real drafter would make: a wrong acceptance
    rule shows at once), sometimes a random token."""
    rng = random.Random(seed)

    def draft(seq):
        prompt, out = tuple(seq.prompt_ids), list(seq.output_ids)
        for _ in range(rng.randint(0, 3)):
            probs = after.get((prompt, tuple(out)))
            if probs is None:
                break
            out.append(max(range(SMALL_VOCAB), key=probs.__getitem__) if rng.random() < 0.7
                       else rng.randrange(SMALL_VOCAB))
        return out[seq.num_output_tokens:]
    return draft


def _sequences_p(counts: Counter, probs: dict[tuple, float]) -> float:
    """chi_square_p of the sampled (prompt, continuation) counts against their exact probabilities
    (each prompt sampled equally often); 0 when a sequence of probability zero was drawn."""
    if not set(counts) <= set(probs):
        return 0.0
    keys = list(probs)
    return chi_square_p(torch.tensor([counts[k] for k in keys], dtype=torch.float64),
                        torch.tensor([probs[k] for k in keys], dtype=torch.float64), groups=len(PROMPTS_SMALL))


@pytest.mark.parametrize("params", [SamplingParams(n=2000, temperature=1.0, max_tokens=4, seed=1),
                                    SamplingParams(n=2000, temperature=0.7, top_p=0.8, max_tokens=4, seed=2)])
def test_speculation_keeps_the_distribution_of_sequences(params):
    dec = small_decoder()
    cfg = EngineConfig(block_size=2, num_blocks=8192, max_num_seqs=4096)
    exact, after = _exact_distribution(dec, params)
    assert sum(exact.values()) == pytest.approx(len(PROMPTS_SMALL))
    spec_engine = Engine(dec, [EOS], cfg, seed=0, spec=SpecConfig())
    spec_engine.speculator = ScriptedSpeculator(plausible_drafts(after, params.seed))
    spec = _sample_sequences(spec_engine, params)
    m = spec_engine.rollout_metrics()
    assert m["spec/drafted_tokens"] > m["spec/accepted_tokens"] > 0.1 * m["spec/drafted_tokens"]
    assert sum(1 for p in exact.values() if p * params.n >= 5) > 8  # many cells are tested
    assert _sequences_p(spec, exact) > 1e-3
    assert _sequences_p(_sample_sequences(Engine(dec, [EOS], cfg, seed=0), params), exact) > 1e-3
    # The test has power: a slightly different temperature is detected.
    other = dataclasses.replace(params, temperature=params.temperature * 1.2)
    assert _sequences_p(_sample_sequences(Engine(dec, [EOS], cfg, seed=0), other), exact) < 1e-6
    assert spec_engine.block_manager.num_free_blocks == 8192


def _reference_logprobs(dec: Decoder, tokens: list[int], num_prompt: int, params: SamplingParams) -> torch.Tensor:
    """Log-probs of tokens[num_prompt:] under the sampling distribution, from one full forward."""
    n = len(tokens)
    caches = dec.allocate_kv_cache(1, n)
    attn = AttentionMetadata.build([n], [n], [[0]], n)
    with torch.inference_mode():
        hidden = dec(torch.tensor(tokens), torch.arange(n), attn, caches)
        logits = dec.compute_logits(hidden[num_prompt - 1:n - 1])
    rows = logits.shape[0]
    shaped = shape_logits(logits, torch.full((rows,), params.temperature), torch.full((rows,), params.top_p),
                          torch.full((rows,), params.top_k))
    return shaped.log_softmax(-1).gather(-1, torch.tensor(tokens[num_prompt:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-graph-layout"])
@pytest.mark.parametrize("params", [SamplingParams(n=4, temperature=0.7, top_p=0.9, max_tokens=20, seed=5),
                                    SamplingParams(n=4, temperature=0.0, max_tokens=20)])
def test_logprobs_of_emitted_tokens_are_the_targets(params, static):
    dec = small_decoder(1)
    engine = Engine(dec, [EOS], EngineConfig(block_size=4, num_blocks=512), spec=SpecConfig())
    engine.speculator = ScriptedSpeculator(random_drafts(7))
    if static:  # verification through the padded static buffers of the CUDA graphs
        engine.spec_runner.use_static_verify()
    comps = engine.generate([Request([1, 2, 3], params, "g", "r"), Request([3, 3], params, "h", "s")])
    assert engine.rollout_metrics()["spec/accepted_tokens"] > 10
    for c in comps:
        ref = _reference_logprobs(dec, c.prompt_ids + c.tokens, len(c.prompt_ids), params)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5)


def _requests(tok, params, prompts):
    return [Request(tok(p, add_special_tokens=False)["input_ids"], params, f"g{i}", f"r{i}")
            for i, p in enumerate(prompts)]


# Speculation at every batch size, arms drawn at random (seeded) instead of by measured throughput:
# what these tests check does not depend on timing.
ALWAYS_EXPLORE = PolicyConfig(min_batch_for_off=10**6, draft_lens=(4, 8, 15), epsilon=1.0, explore_cost=None)

PROMPTS = ["Start with 7. Add 5.", "What is 3 + 4?", "x", "A much longer prompt that spans several cache blocks."]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-graph-layout"])
def test_greedy_outputs_are_identical_with_the_suffix_drafter_over_rounds(tiny_model, static):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=32)
    cfg = EngineConfig(block_size=4, num_blocks=256)
    plain = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg).generate(_requests(tok, params, PROMPTS))
    spec = SpecConfig(policy=ALWAYS_EXPLORE)
    engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg, spec=spec)
    if static:
        engine.spec_runner.use_static_verify()
    accept_lens = []
    for _ in range(3):  # later rounds draft from the earlier rounds' outputs of the same prompts
        comps = engine.generate(_requests(tok, params, PROMPTS))
        assert [c.tokens for c in comps] == [c.tokens for c in plain]
        assert [c.finish_reason for c in comps] == [c.finish_reason for c in plain]
        for a, b in zip(comps, plain):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        accept_lens.append(engine.rollout_metrics().get("spec/accept_len", 1.0))
        assert engine.block_manager.num_free_blocks == 256
    assert accept_lens[-1] > 3.0  # the window of earlier rounds predicts the (repeated) outputs
    assert engine.speculator.drafter.num_prompts == len(PROMPTS)


def _cache_rows(engine: Engine, seq: Sequence, n: int) -> list[torch.Tensor]:
    bs = engine.cfg.block_size
    blocks = torch.tensor([seq.block_table[p // bs] for p in range(n)])
    offsets = torch.arange(n) % bs
    return [c[blocks, offsets] for layer in engine.runner.kv_caches for c in layer]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-graph-layout"])
def test_rejected_drafts_roll_the_cache_back_to_plain_decoding(tiny_model, static):
    model, tok = tiny_model
    params = SamplingParams(temperature=0.0, max_tokens=60)
    prompt = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    cfg = EngineConfig(block_size=4, num_blocks=64)
    truth = Engine(decoder_from_hf_module(model), [], cfg).generate([Request(prompt, params, "g", "r")])[0].tokens
    rng = random.Random(0)

    def partly_right(seq):  # a few true next tokens, then wrong ones
        done = seq.num_output_tokens
        right = truth[done:done + rng.randint(0, 4)]
        return right + [(t + 1) % 259 for t in truth[done + len(right):done + len(right) + rng.randint(1, 5)]]

    spec = Engine(decoder_from_hf_module(model), [], cfg, spec=SpecConfig())
    spec.speculator = ScriptedSpeculator(partly_right)
    if static:  # padding rows write only the scratch block
        spec.spec_runner.use_static_verify()
    plain = Engine(decoder_from_hf_module(model), [], cfg)
    s_seq, p_seq = Sequence(prompt, params), Sequence(prompt, params)
    spec.scheduler.add(s_seq)
    spec.speculator.begin([s_seq])
    plain.scheduler.add(p_seq)
    bm = spec.block_manager
    rejected = 0
    while not s_seq.is_finished:
        spec.step()
        rejected += spec.timeline.steps[-1].drafted - spec.timeline.steps[-1].accepted
        if s_seq.is_finished:
            break
        n = s_seq.num_cached_tokens
        while p_seq.num_cached_tokens < n:
            plain.step()
        assert p_seq.num_cached_tokens == n and s_seq.output_ids == p_seq.output_ids
        # No block is kept for rejected slots: at most the blocks of the sequence's tokens.
        assert s_seq.num_blocks_needed(4, n) <= len(s_seq.block_table) <= s_seq.num_blocks_needed(4)
        for a, b in zip(_cache_rows(spec, s_seq, n), _cache_rows(plain, p_seq, n)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        for i, block in enumerate(s_seq.block_table):  # the prefix map holds accepted tokens only
            if bm.block_hash[block] is not None:
                assert bm._block_key[block][1] == tuple(s_seq.token_slice(4 * i, 4 * i + 4))
                assert 4 * (i + 1) <= s_seq.num_tokens
    assert rejected > 20
    assert s_seq.output_ids == truth
    assert bm.num_free_blocks == 64
    if static:  # the steps did go through the graphs' layout, with query widths up to 16
        assert {q for _, q in spec.spec_runner.graphs.graphs} >= {8, 16}


def test_preemption_with_speculation_keeps_outputs_and_frees_every_block(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=3, temperature=0.0, max_tokens=48)
    big = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(block_size=4, num_blocks=512))
    expected = [c.tokens for c in big.generate(_requests(tok, params, PROMPTS))]
    spec = SpecConfig(policy=ALWAYS_EXPLORE)
    small = Engine(decoder_from_hf_module(model), [tok.eos_token_id],
                   EngineConfig(block_size=4, num_blocks=40, max_num_batched_tokens=64, chunk_size=16), spec=spec)
    for _ in range(2):
        assert [c.tokens for c in small.generate(_requests(tok, params, PROMPTS))] == expected
        assert small.block_manager.num_free_blocks == 40
    assert small.stats["preemptions"] > 0
    assert small.rollout_metrics()["spec/accepted_tokens"] > 0


def test_speculator_state_round_trips_so_a_new_engine_keeps_the_trees(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=30)
    spec = SpecConfig(policy=ALWAYS_EXPLORE)
    first = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(block_size=4, num_blocks=256),
                   spec=spec)
    first.generate(_requests(tok, params, PROMPTS))
    state = first.speculator.state_dict()
    resumed = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(block_size=4, num_blocks=256),
                     spec=spec)
    resumed.speculator.load_state_dict(state)
    assert resumed.speculator.state_dict() == state
    fresh = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(block_size=4, num_blocks=256),
                   spec=spec)
    fresh.generate(_requests(tok, params, PROMPTS))
    resumed.generate(_requests(tok, params, PROMPTS))
    # With the first round's trees, the resumed engine drafts the repeated outputs from the start.
    assert resumed.rollout_metrics()["spec/accept_len"] > fresh.rollout_metrics()["spec/accept_len"] + 1
    with pytest.raises(ValueError, match="version"):
        resumed.speculator.load_state_dict({"version": 99})


def test_no_drafts_while_the_batch_is_large(tiny_model):
    model, tok = tiny_model
    reqs = [Request(tok(p, add_special_tokens=False)["input_ids"], SamplingParams(n=3, temperature=0.0, max_tokens=m),
                    f"g{i}", f"r{i}") for i, (p, m) in enumerate(zip(PROMPTS, (6, 12, 18, 40)))]
    policy = PolicyConfig(min_batch_for_off=4, draft_lens=(8,), epsilon=1.0, explore_cost=None)
    engine = Engine(decoder_from_hf_module(model), [], EngineConfig(block_size=4, num_blocks=256),
                    spec=SpecConfig(policy=policy))
    for _ in range(2):  # the second rollout drafts from the first one's outputs
        comps = engine.generate(reqs)
    assert [len(c.tokens) for c in comps] == [6] * 3 + [12] * 3 + [18] * 3 + [40] * 3
    steps = engine.timeline.steps
    assert [s.live for s in steps if s.drafted] and all(s.live < 4 for s in steps if s.drafted)
    assert engine.rollout_metrics()["spec/draft_seconds"] > 0


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-graph-layout"])
def test_feature_capture_with_speculation_hands_only_accepted_positions(tiny_model, static):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=16)
    reqs = _requests(tok, params, PROMPTS[:2])

    # A stop token the model does emit, so drafts run through a stop and are cut there.
    stop = Engine(decoder_from_hf_module(model), [], EngineConfig(block_size=4, num_blocks=256)).generate(
        reqs)[0].tokens[6]

    def features(truth=None):
        seen, steps = {}, []
        engine = Engine(decoder_from_hf_module(model), [stop], EngineConfig(block_size=4, num_blocks=256),
                        capture_layers=(-1,), feature_sink=steps.append, spec=SpecConfig() if truth else None)
        if truth:  # some true next tokens, then a wrong one
            rng = random.Random(1)

            def draft(seq):
                done, out = seq.num_output_tokens, truth[(seq.request_id, seq.sample_index)]
                right = out[done:done + rng.randint(0, 4)]
                return right + [(out[done + len(right)] + 1) % 259] if done + len(right) < len(out) else right
            engine.speculator = ScriptedSpeculator(draft)
            if static:  # verification graphs' layout, their outputs including the captured layer
                engine.spec_runner.use_static_verify()
        comps = engine.generate(reqs)
        if truth:
            m = engine.rollout_metrics()
            assert m["spec/drafted_tokens"] > m["spec/accepted_tokens"] > 0
            if static:  # the verification steps did go through the graphs' layout
                assert engine.spec_runner.graphs is not None and engine.spec_runner.graphs.graphs
        for f in steps:
            for r in range(f.token_ids.shape[0]):
                key = (f.seq_keys[int(f.owner[r])], int(f.positions[r]))
                assert key not in seen  # every position once: rejected drafts are not handed over
                seen[key] = (int(f.token_ids[r]), f.hidden[-1][r])
        return comps, seen

    plain_comps, plain = features()
    spec_comps, spec = features({(c.request_id, i % 2): c.tokens for i, c in enumerate(plain_comps)})
    assert [c.tokens for c in spec_comps] == [c.tokens for c in plain_comps]
    assert plain_comps[0].finish_reason == "stop" and plain_comps[0].tokens[-1] == stop
    assert set(spec) == set(plain)
    for key, (token, hidden) in plain.items():
        assert spec[key][0] == token
        torch.testing.assert_close(spec[key][1], hidden, atol=1e-5, rtol=1e-4)


def test_released_cache_drops_the_verification_graphs_and_speculation_resumes_after_restore(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=24)
    reqs = _requests(tok, params, PROMPTS[:2])
    cfg = EngineConfig(block_size=4, num_blocks=128)
    expected = [c.tokens for c in Engine(decoder_from_hf_module(model), [], cfg).generate(reqs)]
    engine = Engine(decoder_from_hf_module(model), [], cfg, spec=SpecConfig(policy=ALWAYS_EXPLORE))
    engine.spec_runner.use_static_verify()
    assert [c.tokens for c in engine.generate(reqs)] == expected
    old_cache = engine.runner.kv_caches
    assert engine.spec_runner.graphs.kv_caches is old_cache
    engine.release_cache()
    assert engine.spec_runner.graphs is None  # nothing holds the released cache any more
    engine.restore_cache()
    assert [c.tokens for c in engine.generate(reqs)] == expected
    assert engine.rollout_metrics()["spec/accepted_tokens"] > 0
    assert engine.spec_runner.graphs.kv_caches is engine.runner.kv_caches is not old_cache


def test_a_rollout_without_history_leaves_the_windows_alone(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12)
    engine = Engine(decoder_from_hf_module(model), [], EngineConfig(block_size=4, num_blocks=128),
                    spec=SpecConfig(policy=ALWAYS_EXPLORE))
    engine.generate(_requests(tok, params, PROMPTS[:2]))
    before = engine.speculator.state_dict()["drafter"]
    held_out = [Request(tok(p, add_special_tokens=False)["input_ids"], params, f"eval{i}", f"e{i}")
                for i, p in enumerate(PROMPTS[2:])]
    engine.generate(held_out, history=False)
    assert engine.rollout_metrics()["spec/steps_spec"] > 0  # it still speculated
    assert engine.speculator.state_dict()["drafter"] == before
    engine.generate(held_out)
    after = engine.speculator.state_dict()["drafter"]
    assert after["step"] == before["step"] + 1 and {"eval0", "eval1"} <= {p["group_id"] for p in after["prompts"]}


def test_idle_work_brings_the_trees_where_a_drafting_step_would(tiny_model):
    # Catching up in small units while the GPU is busy must leave the drafter exactly as one
    # catch-up at a drafting step does: the same drafts for every live sequence.
    rng = random.Random(3)
    history = [[rng.randrange(40, 60) for _ in range(30)] for _ in range(4)]

    def rollout(idle: bool):
        spec = Speculator(SpecConfig())
        for out in history:  # an earlier step's outputs of the prompt
            spec.drafter.add_rollout("g0", out)
        spec.drafter.end_step()
        seqs = [s for i in range(2) for s in Sequence.from_request(
            Request([1, 2, 3, i], SamplingParams(n=3, max_tokens=200), f"g{i}", f"r{i}"))]
        spec.begin(seqs)
        done = []
        for start, stop in ((0, 2), (2, 30)):  # registered with a short output, then grown
            for k, seq in enumerate(seqs):  # outputs of several lengths
                for t in history[k % 4][start:min(stop, 5 + 5 * k)]:
                    seq.append_token(t, 0.0)
            if idle:
                # a large batch: only the windows' deferred work (the earlier rollouts), never the live trees
                fed, windows = dict(spec._fed), 0
                while spec.idle_work(live=spec.policy.config.min_batch_for_off):
                    windows += 1
                assert spec._fed == fed and windows == (len(history) if start == 0 else 0)
                while spec.idle_work(live=6, max_tokens=4):
                    done.append(1)
                assert not spec.idle_work(live=6) and spec.idle_seconds > 0
        seqs[5].finish("stop")
        spec._catch_up({s.group_id for s in seqs})
        return [spec.drafter.propose(s.seq_id, s.group_id, s.token_ids[-16:], 8).tokens for s in seqs[:5]], done

    plain, _ = rollout(idle=False)
    caught_up, units = rollout(idle=True)
    assert caught_up == plain and any(plain)
    assert len(units) > 12  # registrations, then the growth in units of at most 4 tokens


def test_decode_replays_hand_the_wait_to_the_speculator_and_outputs_stay(tiny_model):
    # On the GPU the engine polls the replay's event and lets the speculator catch up meanwhile.
    # Here a stand-in event reports "busy" a few times per replay (the CPU has no events).
    model, tok = tiny_model
    reqs = [Request(tok(p, add_special_tokens=False)["input_ids"], SamplingParams(n=3, temperature=0.0, max_tokens=m),
                    f"g{i}", f"r{i}") for i, (p, m) in enumerate(zip(PROMPTS, (6, 12, 18, 40)))]
    cfg = EngineConfig(block_size=4, num_blocks=256, decode_steps=4)
    plain = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg).generate(reqs)
    policy = PolicyConfig(min_batch_for_off=4, draft_lens=(8,), epsilon=1.0, explore_cost=None)
    engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg, spec=SpecConfig(policy=policy))
    engine.runner.use_static_decode()
    engine.spec_runner.use_static_verify()

    class BusyEvent:
        def __init__(self):
            self.polls = 0

        def query(self):
            self.polls += 1
            return self.polls > 3

        def synchronize(self):
            pass

    events = []
    original = engine.runner.launch_decode_steps

    def launch(seqs, k, chained=False):
        launched = original(seqs, k, chained)
        events.append(BusyEvent())
        return dataclasses.replace(launched, done=events[-1])

    engine.runner.launch_decode_steps = launch
    for _ in range(2):  # the second rollout drafts from the first one's outputs
        comps = engine.generate(reqs)
        assert [c.tokens for c in comps] == [c.tokens for c in plain]
    m = engine.rollout_metrics()
    assert events and any(e.polls > 1 for e in events)
    assert m["spec/idle_catch_up_seconds"] > 0 and m["spec/drafted_tokens"] > 0
