"""The learned drafter speculating inside the engine (spec=drafter and spec=both) is lossless:
greedy outputs equal spec=off token for token, sampled sequences follow the target's
distribution (chi-square, the drafter's q in the verification), and the drafts come from the
engine's own feature capture after prefill and plain decode steps."""

import pytest
import torch

from slipstream.drafter import DrafterConfig, RunDrafter, SourcePolicyConfig, TargetHead
from slipstream.models.decoder import Decoder, DecoderConfig
from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.sampler import shape_logits
from slipstream.rollout.spec.policy import PolicyConfig
from slipstream.rollout.spec.speculator import SpecConfig
from slipstream.rollout.types import Request, SamplingParams

from tests.chi_square import chi_square_p

# Drafts at any batch size; arms (draft lengths, sources) drawn at random, seeded, not by timing.
ALWAYS_EXPLORE = PolicyConfig(min_batch_for_off=10**6, draft_lens=(2, 4, 6), epsilon=1.0, explore_cost=None,
                              max_step_draft_tokens=10**6)
SOURCES = {"drafter": ("none", "drafter"), "both": ("none", "suffix", "drafter", "both")}

PROMPTS = ["Start with 7. Add 5.", "What is 3 + 4?", "x", "A much longer prompt that spans several cache blocks."]


def _sources(kind: str) -> SourcePolicyConfig:
    return SourcePolicyConfig(sources=SOURCES[kind], min_batch_for_off=10**6, epsilon=1.0, explore_cost=None)


def _requests(tok, params, prompts=PROMPTS):
    return [Request(tok(p, add_special_tokens=False)["input_ids"], params, f"g{i}", f"r{i}")
            for i, p in enumerate(prompts)]


def _drafting_engine(decoder, eos, cfg, kind, online=True, drafter_config=None, graph_batch=0):
    run = RunDrafter(decoder, drafter_config or DrafterConfig(window=16, batch_tokens=256, seq_len=64, lr=1e-2),
                     online=online, graph_batch=graph_batch)
    engine = run.build_engine(decoder, eos, cfg, 0, SpecConfig(policy=ALWAYS_EXPLORE), _sources(kind))
    return engine, run


@pytest.mark.parametrize("kind,static", [("drafter", False), ("both", True)],
                         ids=["drafter-eager", "both-static-graph-layout"])
def test_greedy_outputs_are_identical_to_plain_decoding(tiny_model, kind, static):
    torch.manual_seed(0)  # the drafter's initial weights (and so how much it learns in two rollouts)
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=40)
    cfg = EngineConfig(block_size=4, num_blocks=256)
    plain = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg).generate(_requests(tok, params))
    # static: the learned chain, and verification with its feature capture, through the graphs'
    # padded static buffers
    engine, run = _drafting_engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg, kind,
                                   graph_batch=8 if static else 0)
    if static:
        engine.spec_runner.use_static_verify()
    per_source = []
    for r in range(3):
        comps = engine.generate(_requests(tok, params))
        assert [c.tokens for c in comps] == [c.tokens for c in plain]
        assert [c.finish_reason for c in comps] == [c.finish_reason for c in plain]
        for a, b in zip(comps, plain):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert engine.block_manager.num_free_blocks == 256
        m = engine.rollout_metrics()
        per_source.append(m)
        # the drafter learns the (repeated) greedy outputs between rollouts; the new weights swap in
        run.train_after_rollout(100)
        run.publish()
    last = per_source[-1]
    assert last["spec/drafter/drafted_tokens"] > 0
    assert last["spec/drafter/version"] == 2.0  # drafted with the weights published after the second rollout
    # untrained, the drafter's greedy guesses are all wrong; trained on two rollouts, a fair share is right
    assert per_source[0]["spec/drafter/acceptance_rate"] < 0.05 < 0.15 < last["spec/drafter/acceptance_rate"]
    assert last["spec/drafter/acceptance_len"] > 0.5
    if kind == "both":  # each source won drafts; "both" steps ran (suffix rows verified as one-hot q)
        assert sum(m.get("spec/suffix/drafted_tokens", 0) for m in per_source) > 0
        assert sum(m.get("spec/source_steps/both", 0) for m in per_source) > 0
    assert run.buffer.num_pairs() > 0
    if static:
        assert engine.spec_runner.graphs.graphs and run.slot._graphs[0].graphs


def test_drafting_starts_after_prefill_and_plain_steps_from_captured_features(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=3, temperature=0.0, max_tokens=30)
    engine, run = _drafting_engine(decoder_from_hf_module(model), [tok.eos_token_id],
                                   EngineConfig(block_size=4, num_blocks=256), "drafter")
    sources = []
    original = engine.speculator.propose

    def propose(scheduler):
        drafts = original(scheduler)
        sources.append(engine.speculator._source)
        return drafts
    engine.speculator.propose = propose
    engine.generate(_requests(tok, params))
    assert sources[0] is None  # the prefill: no sequence decodes yet
    sources = sources[1:]
    # the source policy tries plain steps first, then the drafter; then plain steps and drafts alternate
    assert sources[0] == "none" and sources[1] == "drafter"
    switches = sum(a == "none" and b == "drafter" for a, b in zip(sources, sources[1:]))
    assert switches >= 3
    assert engine.rollout_metrics()["spec/drafter/drafted_tokens"] > 0


# ------------------------------------------------------------------ distribution (chi-square)

V, H, LENGTH = 6, 16, 3
PROMPT = [2, 4]


def _markov_target() -> Decoder:
    """A decoder whose layer adds nothing (o_proj, down_proj zero): the next token's distribution
    depends on the current token only, so the distribution of whole continuations is exact."""
    c = DecoderConfig(model_type="llama", vocab_size=V, hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=H // 2, intermediate_size=H, rms_norm_eps=1e-6)
    decoder = Decoder(c)
    g = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(H, H, generator=g))
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.embed.weight.copy_(basis[:V] * H**0.5)
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        decoder.lm_head.weight.copy_(torch.randn(V, H, generator=g) * 0.6)
    return decoder


def _continuation_probs(decoder: Decoder, params: SamplingParams) -> torch.Tensor:
    """Probability of every LENGTH-token continuation of PROMPT, indexed by its base-V code."""
    logits = TargetHead.from_decoder(decoder).logits(decoder.embed.weight)  # the feature of token a is embed(a)
    table = shape_logits(logits, torch.full((V,), params.temperature), torch.full((V,), params.top_p),
                         torch.full((V,), params.top_k)).softmax(-1).double()
    probs = table[PROMPT[-1]]
    for _ in range(LENGTH - 1):
        probs = (probs[:, None] * table[torch.arange(probs.shape[0]) % V]).reshape(-1)
    return probs


@pytest.mark.parametrize("params", [SamplingParams(n=600, temperature=1.0, max_tokens=LENGTH),
                                    SamplingParams(n=600, temperature=0.7, top_p=0.9, max_tokens=LENGTH)])
def test_sampled_sequences_follow_the_target_with_the_drafters_q(params):
    torch.manual_seed(0)  # the untrained drafter's weights: a q that accepts some drafts and rejects others
    decoder = _markov_target()
    with torch.inference_mode():
        exact = _continuation_probs(decoder, params)
    # An untrained drafter: q differs from p, so min(1, p/q) and the residual max(0, p - q) matter.
    engine, run = _drafting_engine(decoder, [], EngineConfig(block_size=2, num_blocks=8192, max_num_seqs=4096),
                                   "drafter", online=False, drafter_config=DrafterConfig(window=8))
    counts = torch.zeros(V**LENGTH)
    accepted = drafted = 0
    for r in range(8):
        comps = engine.generate([Request(PROMPT, SamplingParams(**{**params.__dict__, "seed": 100 + r}), "g", f"r{r}")])
        for c in comps:
            assert len(c.tokens) == LENGTH
            code = 0
            for t in c.tokens:
                code = code * V + t
            counts[code] += 1
        m = engine.rollout_metrics()
        accepted += m.get("spec/accepted_tokens", 0)
        drafted += m.get("spec/drafter/drafted_tokens", 0)
    assert drafted > 1000 and 0.1 * drafted < accepted < 0.9 * drafted  # real accepts and real rejections
    assert chi_square_p(counts, exact) > 1e-3
    # The test has power: a slightly different temperature is rejected.
    with torch.inference_mode():
        other = _continuation_probs(decoder, SamplingParams(temperature=params.temperature * 1.25, top_p=params.top_p))
    assert chi_square_p(counts, other) < 1e-4


def test_a_rollout_without_history_feeds_no_training_data(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12)
    engine, run = _drafting_engine(decoder_from_hf_module(model), [tok.eos_token_id],
                                   EngineConfig(block_size=4, num_blocks=128), "drafter")
    engine.generate(_requests(tok, params, PROMPTS[:2]), history=False)  # e.g. an evaluation
    assert run.buffer.num_pairs() == 0
    assert engine.rollout_metrics()["spec/drafter/drafted_tokens"] > 0  # it still drafted, from its own capture
    engine.generate(_requests(tok, params, PROMPTS[:2]))
    assert run.buffer.num_pairs() > 0


def _multi_step_drafting_engine(model, tok, cfg: EngineConfig, min_batch_for_off: int):
    """A learned-drafter engine (sources none / drafter) whose multi-step decode replays run
    through the static graph layout on the CPU, and the `chained` flag of each replay it launches."""
    policy = PolicyConfig(min_batch_for_off=min_batch_for_off, draft_lens=(2, 4), epsilon=1.0, explore_cost=None,
                          max_step_draft_tokens=10**6)
    run = RunDrafter(decoder_from_hf_module(model), DrafterConfig(window=16, batch_tokens=256, seq_len=64, lr=1e-2),
                     online=True)
    engine = run.build_engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg, 0, SpecConfig(policy=policy),
                              SourcePolicyConfig(sources=SOURCES["drafter"], min_batch_for_off=min_batch_for_off,
                                                 epsilon=1.0, explore_cost=None))
    engine.runner.use_static_decode()
    launches = []
    original = engine.runner.launch_decode_steps
    engine.runner.launch_decode_steps = lambda seqs, k, chained=False: launches.append(chained) or original(
        seqs, k, chained)
    return engine, run, launches


def test_multi_step_replays_feed_the_drafter_and_drafting_follows_losslessly(tiny_model):
    # While 4+ sequences live the speculator is off and decode steps run 4 per (chained) replay,
    # their features captured per step; below that the drafter drafts from those features.
    torch.manual_seed(0)
    model, tok = tiny_model

    def requests():  # 4 prompts x 2 samples ending one prompt after another: 8, 6, 4, then 2 live
        return [Request(tok(p, add_special_tokens=False)["input_ids"],
                        SamplingParams(n=2, temperature=0.0, max_tokens=10 + 20 * i), f"g{i}", f"r{i}")
                for i, p in enumerate(PROMPTS)]

    cfg = EngineConfig(block_size=4, num_blocks=256, decode_steps=4)
    plain = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg).generate(requests())
    engine, run, launches = _multi_step_drafting_engine(model, tok, cfg, min_batch_for_off=4)
    ended = []
    release = engine.speculator.finished
    engine.speculator.finished = lambda seqs: ended.extend(seqs) or release(seqs)
    # The replays' rows wait in the graphs' ring until read: each learned draft must see every
    # sequence's newest feature h_{n-1} (position num_tokens - 2) in the windows.
    fresh, windows, draft, context = [], engine.speculator.windows, engine.speculator._learned_draft, \
        engine.speculator.windows.context

    def learned_draft(seqs, k):
        expected = {(s.request_id, s.sample_index): s.num_tokens - 2 for s in seqs}

        def checked_context(keys, last):
            newest = windows._newest[[windows._slots[key] for key in keys]].tolist()
            fresh.append(newest == [expected[key] for key in keys])
            return context(keys, last)
        windows.context = checked_context
        return draft(seqs, k)
    engine.speculator._learned_draft = learned_draft
    comps = engine.generate(requests())
    assert fresh and all(fresh)
    assert len({(s.request_id, s.sample_index) for s in ended}) == 8  # every window given back as its sequence ended
    assert [c.tokens for c in comps] == [c.tokens for c in plain]
    for a, b in zip(comps, plain):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert engine.block_manager.num_free_blocks == 256
    assert launches and any(launches)  # multi-step replays ran, chained ones among them
    assert engine.rollout_metrics()["spec/drafter/drafted_tokens"] > 0  # and drafting took over below 4 live
    assert run.buffer.num_pairs() > 0


@pytest.mark.parametrize("forced,expect_chained", [("none", True), ("drafter", False)])
def test_replays_chain_where_the_source_policy_picks_none(tiny_model, forced, expect_chained):
    # Below min_batch_for_off the source policy decides each step: "none" chains the decode
    # replays as spec=off does, their steps counted for "none"; a drafting source does not chain.
    torch.manual_seed(0)
    model, tok = tiny_model
    params = SamplingParams(n=2, temperature=0.0, max_tokens=24)
    cfg = EngineConfig(block_size=4, num_blocks=256, decode_steps=4)
    plain = Engine(decoder_from_hf_module(model), [tok.eos_token_id], cfg).generate(_requests(tok, params))
    engine, run, launches = _multi_step_drafting_engine(model, tok, cfg, min_batch_for_off=64)
    engine.generate(_requests(tok, params))  # the drafter has weights to draft with from the first publish on
    launches.clear()
    engine.speculator.sources.choose = lambda live: forced
    comps = engine.generate(_requests(tok, params))
    assert [c.tokens for c in comps] == [c.tokens for c in plain]
    assert any(launches) == expect_chained
    none_steps = engine.speculator.sources.stats(8)["none"][0]
    if expect_chained:  # every replayed step counted for "none", and nothing was drafted
        assert none_steps > 0 and engine.rollout_metrics().get("spec/drafter/drafted_tokens", 0.0) == 0.0
    else:
        assert engine.rollout_metrics()["spec/drafter/drafted_tokens"] > 0


def test_idle_time_goes_to_the_suffix_trees_only_where_suffix_drafts_can_be_chosen():
    from types import SimpleNamespace

    from slipstream.drafter.engine_drafting import DraftingSpeculator
    from slipstream.drafter.source_policy import SourcePolicy, SourcePolicyConfig

    def catches_up(sources):
        fake = SimpleNamespace(sources=SourcePolicy(SourcePolicyConfig(sources=sources)))
        return DraftingSpeculator.catches_up_in_idle_time.fget(fake)

    assert not catches_up(("none", "drafter"))
    assert catches_up(("none", "suffix")) and catches_up(("none", "drafter", "both"))
