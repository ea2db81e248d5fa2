"""The source policy: per bucket, the fastest measured source wins, a slower-than-plain source is
never exploited, and "both" keeps the draft expected to be accepted longer."""

import pytest
import torch

from slipstream.drafter.model import Draft
from slipstream.drafter.source_policy import SourcePolicy, SourcePolicyConfig, combine_drafts
from slipstream.rollout.spec.suffix_tree import SuffixDraft

# tokens/s by (bucket lower edge, source)
SPEED = {1: {"none": 100, "suffix": 150, "drafter": 190, "both": 210},
         16: {"none": 1000, "suffix": 1010, "drafter": 900, "both": 940}}


def _run(policy: SourcePolicy, live_batch: int, steps: int) -> list[str]:
    chosen = []
    for _ in range(steps):
        s = policy.choose(live_batch)
        chosen.append(s)
        policy.record(live_batch, s, SPEED[policy.bucket(live_batch)][s], 1.0)
    return chosen


def test_each_bucket_exploits_its_fastest_source_within_the_guard():
    policy = SourcePolicy(SourcePolicyConfig(epsilon=0.0))
    small = _run(policy, 1, 10)
    assert small[:4] == ["none", "suffix", "drafter", "both"]  # each tried once, the baseline first
    assert set(small[4:]) == {"both"}
    large = _run(policy, 20, 10)
    assert set(large[4:]) == {"suffix"}  # 1% faster than none; the drafter is 10% slower: never exploited
    assert policy.stats(20)["drafter"] == (1, 900.0)
    assert policy.choose(64) == "none"  # at or above min_batch_for_off


def test_state_round_trip_and_config_errors():
    policy = SourcePolicy(SourcePolicyConfig(epsilon=0.0))
    _run(policy, 1, 6)
    other = SourcePolicy(SourcePolicyConfig(epsilon=0.0))
    other.load_state_dict(policy.state_dict())
    assert other.greedy(1) == "both" and other.stats(1) == policy.stats(1)
    with pytest.raises(ValueError, match="starting with 'none'"):
        SourcePolicyConfig(sources=("suffix", "none"))
    with pytest.raises(ValueError, match="sources"):
        SourcePolicy(SourcePolicyConfig(sources=("none", "suffix"))).load_state_dict(policy.state_dict())


def _learned(q_chosen: list[list[float]], V: int = 8) -> Draft:
    """A learned draft whose token j of request b is j with probability q_chosen[b][j]."""
    B, K = len(q_chosen), len(q_chosen[0])
    tokens = torch.arange(K).repeat(B, 1)
    probs = torch.zeros(B, K, V)
    for b in range(B):
        for j in range(K):
            probs[b, j, j] = q_chosen[b][j]
            probs[b, j, V - 1] = 1 - q_chosen[b][j]
    return Draft(tokens, probs)


def test_both_keeps_the_draft_expected_to_be_accepted_longer():
    suffix = [SuffixDraft([5, 6, 7], [0.9, 0.9, 0.9]),  # score 0.9 + 0.81 + 0.729 = 2.44
              SuffixDraft([5, 6], [0.3, 0.3]),  # 0.39
              None]
    learned = _learned([[0.5, 0.5, 0.5], [0.9, 0.9, 0.9], [0.2, 0.2, 0.2]])
    out = combine_drafts("both", [3, 3, 2], 8, suffix=suffix, drafter=learned)
    assert out.sources == ["suffix", "drafter", "drafter"]
    assert out.lens.tolist() == [3, 3, 2]
    assert out.tokens[0].tolist() == [5, 6, 7] and out.tokens[1].tolist() == [0, 1, 2]
    # suffix rows verify as deterministic drafts (one-hot q), learned rows with their q
    assert torch.equal(out.probs[0].argmax(-1), torch.tensor([5, 6, 7])) and out.probs[0].max() == 1.0
    assert torch.equal(out.probs[1], learned.probs[1])
    assert out.probs[2, 2].sum() == 0  # beyond the budget: nothing


def test_single_sources_and_budgets():
    suffix = [SuffixDraft([5, 6, 7], [0.1, 0.1, 0.1]), None]
    learned = _learned([[0.9] * 4, [0.9] * 4])
    only_suffix = combine_drafts("suffix", [2, 4], 8, suffix=suffix, drafter=learned)
    assert only_suffix.sources == ["suffix", None] and only_suffix.lens.tolist() == [2, 0]
    assert only_suffix.probs is None  # deterministic drafts only
    only_learned = combine_drafts("drafter", [0, 4], 8, suffix=suffix, drafter=learned)
    assert only_learned.sources == [None, "drafter"] and only_learned.lens.tolist() == [0, 4]
    none = combine_drafts("none", [4, 4], 8, suffix=suffix, drafter=learned)
    assert none.lens.tolist() == [0, 0] and none.probs is None
    with pytest.raises(ValueError, match="unknown source"):
        combine_drafts("tree", [1], 8)
