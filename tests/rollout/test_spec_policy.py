"""SpecPolicy: the batch-size switch, the per-bucket throughput bandit, its guard, length classes
and the per-step cap on drafted tokens."""

import json
import random
from collections import Counter

import pytest

from slipstream.rollout.spec import PolicyConfig, SpecPolicy

BUCKETS = (1, 2, 4, 8, 16)


def _train(policy, best, live_batches=BUCKETS, base=100.0, gain=50.0):
    """Record every arm once per bucket: the bucket's best arm runs at base + gain tokens/s, the
    others at base - arm / 100 (distinct, all below the best)."""
    for lb in live_batches:
        for arm in policy.config.draft_lens:
            thr = base + gain if arm == best[lb] else base - arm / 100
            policy.record(lb, arm, int(thr * 10), 10.0)


def test_no_speculation_at_large_batch():
    policy = SpecPolicy(PolicyConfig(min_batch_for_off=32, epsilon=0.0))
    reqs = [(f"r{i}", "g") for i in range(40)]
    for lb in (32, 40, 100):
        assert set(policy.plan(reqs, lb).values()) == {0}
        assert policy.arm_for(lb) == 0
    # below the switch, arm 0 is tried first (baseline), then the next untried arm
    assert set(policy.plan(reqs[:4], 4).values()) == {0}
    assert policy.arm_for(4) == 0
    policy.record(4, 0, 100, 1.0)
    assert policy.arm_for(4) == 0
    assert set(policy.plan(reqs[:4], 4).values()) == {2}
    assert policy.arm_for(4) == 2
    # records at or above the switch are not counted
    policy.record(40, 2, 100, 1.0)
    assert policy.stats(31)[2][0] == 0


def test_budgets_grow_as_batch_drains():
    policy = SpecPolicy(PolicyConfig(epsilon=0.0, max_step_draft_tokens=10_000))
    best = {16: 2, 8: 4, 4: 8, 2: 16, 1: 16}
    _train(policy, best)
    budgets = []
    for lb in (16, 8, 4, 2, 1):
        plan = policy.plan([(f"r{i}", "unknown") for i in range(lb)], lb)
        assert len(set(plan.values())) == 1
        budgets.append(plan["r0"])
        assert policy.arm_for(lb) == best[lb]
    assert budgets == [2, 4, 8, 16, 16]
    assert set(policy.plan([("r0", "unknown")], 24).values()) == {2}  # bucket 16
    assert set(policy.plan([("r0", "unknown")], 32).values()) == {0}


def test_length_classes():
    policy = SpecPolicy(PolicyConfig(epsilon=0.0, bucket_edges=(1,)))
    _train(policy, {1: 8}, live_batches=(1,))
    policy.set_expected_lengths({"short": 100.0, "mid": 500.0, "long": 2000.0, "new": None})
    assert [policy.length_class(g) for g in ("short", "mid", "long", "new", "unseen")] == \
        [0, 1, 2, 1, 1]
    reqs = [("a", "short"), ("b", "mid"), ("c", "long"), ("d", "new"), ("e", "unseen")]
    plan = policy.plan(reqs, 5)
    assert plan == {"a": 4, "b": 8, "c": 16, "d": 8, "e": 8}
    assert plan["c"] > plan["b"] > plan["a"]
    # the long boost is capped by the largest arm
    assert policy.budget_for_class(16, 2) == 16
    assert policy.budget_for_class(1, 0) == 1
    assert policy.budget_for_class(0, 2) == 0
    # ties share a class; a single known prompt is in the middle class
    policy.set_expected_lengths({"x": 300.0, "y": 300.0, "z": 300.0})
    assert {policy.length_class(g) for g in "xyz"} == {1}
    policy.set_expected_lengths({"x": 300.0, "y": 900.0})
    assert (policy.length_class("x"), policy.length_class("y")) == (0, 2)


def test_per_step_cap_exact():
    cfg = PolicyConfig(epsilon=0.0, bucket_edges=(1,), max_step_draft_tokens=50)
    policy = SpecPolicy(cfg)
    _train(policy, {1: 8}, live_batches=(1,))
    lengths = {f"g{i}": float(100 * (i + 1)) for i in range(9)}
    policy.set_expected_lengths(lengths)
    reqs = [(f"r{i}", f"g{i % 9}") for i in range(20)]
    plan = policy.plan(reqs, 20)
    raw = {k: policy.budget_for_class(8, policy.length_class(g)) for k, g in reqs}
    assert sum(raw.values()) > 50
    assert sum(plan.values()) == 50
    assert all(plan[k] <= raw[k] for k in raw)
    # proportional scaling keeps the order between classes
    by_class = {}
    for k, g in reqs:
        by_class.setdefault(policy.length_class(g), []).append(plan[k])
    assert min(by_class[2]) >= max(by_class[1]) >= max(by_class[0])
    assert min(by_class[2]) > max(by_class[0])
    # under the cap, nothing changes
    few = reqs[:3]
    assert policy.plan(few, 3) == {k: raw[k] for k, _ in few}


def _thr(bucket, arm):
    best = {1: 8, 2: 8, 4: 4, 8: 2, 16: 0}[bucket]
    return 1000.0 - 40.0 * abs(arm - best)


@pytest.mark.parametrize("seed", [0, 1])
def test_bandit_converges_per_bucket(seed):
    policy = SpecPolicy(PolicyConfig(epsilon=0.1, seed=seed))
    picks = {b: [] for b in BUCKETS}
    for step in range(1500):
        lb = BUCKETS[step % len(BUCKETS)]
        policy.plan([("r", "g")], lb)
        arm = policy.arm_for(lb)
        picks[lb].append(arm)
        policy.record(lb, arm, int(_thr(lb, arm)), 1.0)
    for b, seq in picks.items():
        assert seq[0] == 0
        assert sorted(seq[:5]) == [0, 2, 4, 8, 16]  # every arm once before exploiting
        best = max(policy.config.draft_lens, key=lambda a: _thr(b, a))
        assert policy.greedy_arm(b) == best
        late = Counter(seq[100:])
        assert late[best] / sum(late.values()) > 0.85, (b, late)


def test_guard_against_slower_than_plain():
    policy = SpecPolicy(PolicyConfig(epsilon=0.0, bucket_edges=(1,), draft_lens=(0, 4, 8)))
    policy.record(1, 0, 1000, 1.0)
    policy.record(1, 4, 950, 1.0)   # 5% slower than plain decoding
    policy.record(1, 8, 980, 1.0)   # 2% slower: within the margin
    assert policy.exploitable_arms(1) == [0, 8]
    assert policy.greedy_arm(1) == 0
    # even when arm 0's mean is dragged below the others by later samples, the guard applies
    policy.record(1, 0, 900, 1.0)    # arm 0 mean 950
    policy.record(1, 4, 800, 1.0)    # arm 4 mean 875: > 3% below 950
    assert 4 not in policy.exploitable_arms(1)
    assert policy.greedy_arm(1) == 8  # 980 within margin of 950 and the fastest
    for _ in range(200):
        policy.plan([("r", "g")], 1)
        assert policy.arm_for(1) != 4
    # exploration may still pick it
    explorer = SpecPolicy(PolicyConfig(epsilon=1.0, bucket_edges=(1,), draft_lens=(0, 4, 8)))
    explorer.load_state_dict(policy.state_dict())
    seen = set()
    for _ in range(100):
        explorer.plan([("r", "g")], 1)
        seen.add(explorer.arm_for(1))
    assert 4 in seen


def test_state_round_trip_reproduces_plans():
    cfg = PolicyConfig(epsilon=0.3, seed=7, max_step_draft_tokens=40)
    a = SpecPolicy(cfg)
    for step in range(60):
        lb = BUCKETS[step % len(BUCKETS)]
        a.plan([("r", "g")], lb)
        arm = a.arm_for(lb)
        a.record(lb, arm, int(_thr(lb, arm)), 1.0)
    a.set_expected_lengths({"g0": 100.0, "g1": 700.0, "g2": None, "g3": 3000.0})
    state = json.loads(json.dumps(a.state_dict()))
    b = SpecPolicy(PolicyConfig(epsilon=0.3, seed=123, max_step_draft_tokens=40))
    b.load_state_dict(state)
    fresh = SpecPolicy(PolicyConfig(epsilon=0.3, seed=7, max_step_draft_tokens=40))
    fresh.set_expected_lengths({"g0": 100.0, "g1": 700.0, "g2": None, "g3": 3000.0})
    reqs = [(f"r{i}", f"g{i % 4}") for i in range(12)]
    plans_a, plans_b, plans_f = [], [], []
    for step in range(50):
        lb = BUCKETS[step % len(BUCKETS)]
        for p, out in ((a, plans_a), (b, plans_b), (fresh, plans_f)):
            out.append(p.plan(reqs, lb))
            arm = p.arm_for(lb)
            p.record(lb, arm, int(_thr(lb, arm)), 1.0)
    assert plans_a == plans_b
    assert plans_a != plans_f
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["config"]["seed"] == 7 and sb["config"]["seed"] == 123
    del sa["config"], sb["config"]
    assert sa == sb


def test_a_replayed_step_counts_for_arm_0_whatever_the_next_steps_arm():
    # The engine asks `will_draft` for the next replay before it reads the replay in flight; the
    # steps it then reads drafted nothing, so they count for arm 0, not for the arm just chosen.
    from slipstream.rollout.scheduler import ScheduledBatch
    from slipstream.rollout.spec.speculator import SpecConfig, Speculator

    spec = Speculator(SpecConfig(policy=PolicyConfig(min_batch_for_off=32, draft_lens=(0, 2))))
    spec.policy.choose_arm = lambda live: 2
    assert spec.will_draft(8)
    spec.observe(ScheduledBatch(entries=[], block_size=4, num_emitted=8), 8, 0.01)
    stats = spec.policy.stats(8)
    assert stats[0][0] == 1 and stats[2][0] == 0


def test_a_plan_under_a_chosen_arm_draws_nothing_more():
    # `will_draft` draws the next step's arm; that step's plan takes it instead of drawing again
    p = SpecPolicy(PolicyConfig(min_batch_for_off=32, draft_lens=(0, 2, 4), epsilon=1.0, seed=1))
    state = p.state_dict()
    budgets = p.plan([("a", "g0"), ("b", "g1")], 8, arm=4)
    assert set(budgets.values()) == {4} and p.arm_for(8) == 4
    assert p.state_dict()["rng"] == state["rng"]  # no draw


@pytest.mark.parametrize("seed", [0, 1])
def test_exploring_slower_arms_costs_at_most_explore_cost(seed):
    # drafting loses in this bucket: arm 0 is plain decoding at 1000 tokens/s, the drafting arms
    # run at a half down to a tenth of that (their steps take 2x-10x as long)
    speed = {0: 1000.0, 2: 500.0, 4: 300.0, 8: 200.0, 16: 100.0}
    cfg = PolicyConfig(epsilon=0.1, explore_cost=0.01, bucket_edges=(1,), seed=seed)
    policy = SpecPolicy(cfg)
    rng = random.Random(seed)
    seconds, steps, played = 0.0, 40_000, Counter()
    for _ in range(steps):
        arm = policy.choose_arm(1)
        played[arm] += 1
        thr = speed[arm] * rng.uniform(0.95, 1.05)  # noisy wall-clock measurements
        seconds += 1.0 / thr
        policy.record(1, arm, 1, 1.0 / thr)
    overhead = seconds / (steps / speed[0]) - 1.0
    # uniform epsilon-greedy would play each drafting arm in 2% of the steps: 33% slower in all
    assert overhead < cfg.explore_cost * 1.5, overhead
    assert overhead < cfg.guard_margin
    # every slower arm is still measured now and then, more often the less it loses
    assert all(played[a] > 0 for a in speed)
    assert played[2] > played[4] > played[16]
    assert policy.exploration_keep(1, 0) == 1.0
    assert policy.exploration_keep(1, 2) == pytest.approx(0.01 / (0.1 * 1.0), rel=0.1)


def test_an_arm_faster_than_plain_is_explored_uniformly():
    policy = SpecPolicy(PolicyConfig(epsilon=0.1, bucket_edges=(1,), draft_lens=(0, 4, 8)))
    policy.record(1, 0, 1000, 1.0)
    policy.record(1, 4, 1500, 1.0)
    policy.record(1, 8, 1200, 1.0)
    assert policy.exploration_keep(1, 8) == 1.0  # slower than the greedy arm 4, faster than arm 0
    assert policy.exploration_keep(1, 0) == 1.0
    with pytest.raises(ValueError, match="explore_cost"):
        PolicyConfig(explore_cost=1.5)
    policy.record(1, 8, 100, 1.0)  # arm 8 now slower than arm 0 (mean 650)
    assert policy.exploration_keep(1, 8) < 1.0
    policy.config.explore_cost = None  # every arm explored alike
    assert policy.exploration_keep(1, 8) == 1.0
