import copy

import pytest
import torch

from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.hf_backend import HFRolloutBackend, apply_sampling_params
from slipstream.rollout.types import Request, SamplingParams

PROMPTS = ["Start with 7. Add 5.", "What is 3 + 4?", "x", "A much longer prompt that spans several cache blocks."]


def _requests(tok, params, prompts=PROMPTS):
    return [Request(tok(p, add_special_tokens=False)["input_ids"], params, f"g{i}", f"r{i}")
            for i, p in enumerate(prompts)]


def _engine(model, tok, **kw):
    return Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(**kw))


def test_greedy_matches_hf_generate_token_for_token(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(temperature=0.0, max_tokens=40)
    ours = _engine(model, tok, block_size=4, num_blocks=256).generate(_requests(tok, params))
    theirs = HFRolloutBackend(model, tok).generate(_requests(tok, params))
    for a, b in zip(ours, theirs):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_a_small_cache_preempts_without_changing_outputs_or_leaking(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=3, temperature=0.0, max_tokens=48)
    big = _engine(model, tok, block_size=4, num_blocks=512).generate(_requests(tok, params))
    small_engine = _engine(model, tok, block_size=4, num_blocks=40, max_num_batched_tokens=64, chunk_size=16)
    small = small_engine.generate(_requests(tok, params))
    assert small_engine.stats["preemptions"] > 0
    assert [c.tokens for c in small] == [c.tokens for c in big]
    assert small_engine.block_manager.num_free_blocks == 40


def test_a_failed_generate_leaves_nothing_behind_and_release_cache_refuses_mid_rollout(tiny_model):
    model, tok = tiny_model
    def requests():  # the first prompt's samples end long before the others'
        reqs = _requests(tok, SamplingParams(n=2, temperature=0.8, max_tokens=32, seed=5))
        reqs[0].params = SamplingParams(n=2, temperature=0.8, max_tokens=3)
        return reqs

    want = _engine(model, tok, block_size=4, num_blocks=256).generate(requests())
    engine = _engine(model, tok, block_size=4, num_blocks=256, enable_prefix_sharing=False)

    def release_mid_rollout(n):
        engine.release_cache()

    with pytest.raises(RuntimeError, match="release_cache.*running.*waiting sequences still need the cache"):
        engine.generate(requests(), progress=release_mid_rollout)
    # the failed call's sequences are gone with their blocks: the next call is as on a fresh engine
    assert not engine.scheduler.has_work() and engine.block_manager.num_free_blocks == 256
    got = engine.generate(requests())
    assert [c.tokens for c in got] == [c.tokens for c in want]
    for a, b in zip(got, want):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    engine.release_cache()  # between calls it is allowed


def test_prompt_ids_outside_the_vocabulary_are_refused_before_anything_runs(tiny_model):
    model, tok = tiny_model
    engine = _engine(model, tok, block_size=4, num_blocks=64)
    vocab = engine.runner.decoder.config.vocab_size
    for bad in (vocab, -1):
        reqs = _requests(tok, SamplingParams(max_tokens=4))
        reqs[2].prompt_ids = reqs[2].prompt_ids + [bad]
        for backend in (engine, HFRolloutBackend(model, tok)):
            with pytest.raises(ValueError, match=rf"request 'r2': prompt token id {bad} is outside .*\[0, {vocab}\)"):
                backend.generate(reqs)
        assert not engine.scheduler.has_work() and engine.block_manager.num_free_blocks == 64


def test_prefix_sharing_changes_nothing_but_memory(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=4, temperature=0.8, max_tokens=24, seed=3)
    shared = _engine(model, tok, block_size=4, num_blocks=256).generate(_requests(tok, params))
    plain = _engine(model, tok, block_size=4, num_blocks=256, enable_prefix_sharing=False).generate(
        _requests(tok, params))
    assert [c.tokens for c in shared] == [c.tokens for c in plain]


@pytest.mark.parametrize("params", [SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=16, seed=0),
                                    SamplingParams(n=3, temperature=1.2, top_k=7, max_tokens=16, seed=1)])
def test_sampled_logprobs_are_those_of_the_sampling_distribution(tiny_model, params):
    model, tok = tiny_model
    for c in _engine(model, tok, block_size=8, num_blocks=128).generate(_requests(tok, params)):
        ids = torch.tensor([c.prompt_ids + c.tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(c.prompt_ids) - 1 : -1]
        ref = apply_sampling_params(logits, params).log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None])
        assert torch.allclose(torch.tensor(c.logprobs), ref.squeeze(-1), atol=1e-4)


def test_weight_sync_makes_the_engine_follow_the_trainer(tiny_model):
    model, tok = copy.deepcopy(tiny_model[0]), tiny_model[1]
    engine = _engine(model, tok, block_size=4, num_blocks=256)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = SamplingParams(temperature=0.0, max_tokens=24)
    seconds = engine.load_weights(model.named_parameters())
    assert seconds >= 0
    ours = engine.generate(_requests(tok, params))
    theirs = HFRolloutBackend(model, tok).generate(_requests(tok, params))
    assert [c.tokens for c in ours] == [c.tokens for c in theirs]


def test_feature_capture_hands_hidden_states_of_generated_tokens(tiny_model):
    model, tok = tiny_model
    steps = []
    engine = Engine(decoder_from_hf_module(model), [tok.eos_token_id], EngineConfig(block_size=4, num_blocks=256),
                    capture_layers=(0, -1), feature_sink=steps.append)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=10)
    comps = engine.generate(_requests(tok, params, PROMPTS[:2]))
    plain = _engine(model, tok, block_size=4, num_blocks=256).generate(_requests(tok, params, PROMPTS[:2]))
    assert [c.tokens for c in comps] == [c.tokens for c in plain]  # capture changes nothing
    # Collect, per sequence and position, the captured states, and compare with HF's hidden states.
    seen = {}
    for f in steps:
        for r in range(f.token_ids.shape[0]):
            key = f.seq_keys[int(f.owner[r])]
            seen[(key, int(f.positions[r]))] = (int(f.token_ids[r]), f.hidden[0][r], f.hidden[-1][r])
    c = comps[1]
    full = c.prompt_ids + c.tokens
    with torch.no_grad():
        hs = model(torch.tensor([full]), output_hidden_states=True).hidden_states
    for pos in range(len(full) - 1):  # the last sampled token is never fed back
        token, h0, h_last = seen[((c.request_id, 0), pos)]
        assert token == full[pos]
        assert torch.allclose(h0, hs[1][0, pos], atol=1e-4)
    for x in comps:  # every generated token fed back is captured for its own sample (shared prompts once)
        for pos in range(len(x.prompt_ids), len(x.prompt_ids) + len(x.tokens) - 1):
            assert seen[((x.request_id, comps.index(x) % 2), pos)][0] == x.tokens[pos - len(x.prompt_ids)]


def test_skip_softmax_reports_sparsity_and_tiny_thresholds_change_nothing(tiny_model):
    model, tok = tiny_model
    long_prompts = ["Start with 7. " * 30, "What is 3 + 4? " * 25]  # several key tiles per sequence
    params = SamplingParams(temperature=0.0, max_tokens=8)
    dense = _engine(model, tok, block_size=16, num_blocks=256).generate(_requests(tok, params, long_prompts))
    tiny = _engine(model, tok, block_size=16, num_blocks=256, prefill_skip_scale=1e-30, decode_skip_scale=1e-30)
    assert [c.tokens for c in tiny.generate(_requests(tok, params, long_prompts))] == [c.tokens for c in dense]
    assert tiny.sparsity() == {"prefill": 0.0, "decode": 0.0}
    big = _engine(model, tok, block_size=16, num_blocks=256, prefill_skip_scale=1e6, decode_skip_scale=1e6)
    big.generate(_requests(tok, params, long_prompts))
    measured = big.sparsity()
    assert set(measured) == {"prefill", "decode"} and measured["decode"] > 0 and measured["prefill"] > 0
    assert big.sparsity() == {}  # counters were reset by the read
