import math

import pytest
import torch

from slipstream.rollout.hf_backend import HFRolloutBackend, apply_sampling_params
from slipstream.rollout.types import Request, SamplingParams


def _reference_logprobs(model, prompt, tokens, params):
    """Independent check: one unpadded forward over prompt+tokens, shaped with the same rules."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(tokens) - 1].float()
    shaped = apply_sampling_params(logits, params)
    return shaped.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def _requests(tok, params, texts):
    return [Request(tok(t, add_special_tokens=False)["input_ids"], params, f"g{i}", f"r{i}")
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("params", [
    SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1),
    SamplingParams(n=2, temperature=0.7, top_p=0.8, max_tokens=12, seed=2),
    SamplingParams(n=2, temperature=1.3, top_k=5, max_tokens=12, seed=3),
    SamplingParams(n=1, temperature=0.0, max_tokens=12),
])
def test_logprobs_are_those_of_the_sampling_distribution(tiny_model, params):
    model, tok = tiny_model
    engine = HFRolloutBackend(model, tok, batch_size=4)  # several batches, ragged prompts
    reqs = _requests(tok, params, ["Start with 3.", "Add 12 then multiply", "x"])
    comps = engine.generate(reqs)
    assert len(comps) == 3 * params.n
    assert [c.request_id for c in comps] == [r.request_id for r in reqs for _ in range(params.n)]
    for c in comps:
        assert len(c.tokens) == len(c.logprobs) >= 1
        ref = _reference_logprobs(model, c.prompt_ids, c.tokens, params)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=2e-4), (c.logprobs, ref)
        assert all(math.isfinite(x) and x <= 1e-6 for x in c.logprobs)


def test_greedy_is_deterministic_and_picks_argmax(tiny_model):
    model, tok = tiny_model
    params = SamplingParams(temperature=0.0, max_tokens=8)
    engine = HFRolloutBackend(model, tok)
    a = engine.generate(_requests(tok, params, ["abc", "hello world"]))
    b = engine.generate(_requests(tok, params, ["hello world"]))
    assert a[1].tokens == b[0].tokens  # padding next to a longer prompt changes nothing
    ids = torch.tensor([a[0].prompt_ids + a[0].tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(a[0].prompt_ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == a[0].tokens


def test_finish_reasons_and_stop_tokens(tiny_model):
    model, tok = tiny_model
    engine = HFRolloutBackend(model, tok)
    # Every token id is a stop token: generation must stop after exactly one token.
    all_stop = SamplingParams(n=2, max_tokens=6, stop_token_ids=tuple(range(len(tok))), seed=0)
    for c in engine.generate(_requests(tok, all_stop, ["abc"])):
        assert c.finish_reason == "stop" and len(c.tokens) == 1
    # The model's EOS always stops too (as in the native engine), besides params.stop_token_ids.
    other = SamplingParams(n=8, max_tokens=6, stop_token_ids=(len(tok) + 5,), seed=0)
    for c in engine.generate(_requests(tok, other, ["abc"])):
        stops = [t for t in c.tokens if t in (tok.eos_token_id, len(tok) + 5)]
        if c.finish_reason == "stop":
            assert stops == [c.tokens[-1]] == [tok.eos_token_id]
        else:
            assert c.finish_reason == "length" and len(c.tokens) == 6 and not stops


def test_top_k_and_top_p_truncate_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    k2 = apply_sampling_params(logits, SamplingParams(top_k=2))
    assert torch.isfinite(k2).sum() == 2 and torch.isfinite(k2[0, :2]).all()
    probs = logits.softmax(-1)[0]
    # top_p keeps the smallest prefix (by probability) whose mass reaches p.
    p = float(probs[0] + probs[1]) - 1e-4
    kept = torch.isfinite(apply_sampling_params(logits, SamplingParams(top_p=p)))[0]
    assert kept.tolist() == [True, True, False, False, False]
    t = apply_sampling_params(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(t, logits * 2)


def test_sampling_params_reject_bad_values():
    for bad in (dict(n=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=0), dict(max_tokens=0),
                dict(stop_token_ids=(3, -1)), dict(stop_token_ids=("2",)), dict(seed=1.5), dict(logprobs=5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop_token_ids=(0, 7), seed=3).stop_token_ids == (0, 7)
