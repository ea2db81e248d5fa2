import gc
import json
import random
import time

import pytest

from slipstream.rollout.spec.suffix_tree import SuffixConfig, SuffixDrafter, SuffixTree


# ------------------------------------------------ a brute-force reading of the index

def _strings(seqs, depth):
    """Every stored string: tokens[j : j + max_depth] for each sequence and start j."""
    for toks in seqs:
        for j in range(len(toks)):
            yield toks[j:j + depth]


def _ref_count(seqs, depth, path):
    return sum(1 for s in _strings(seqs, depth) if s[:len(path)] == path and len(s) >= len(path))


def _ref_continuations(seqs, depth, path):
    out = {}
    for s in _strings(seqs, depth):
        if len(s) > len(path) and s[:len(path)] == path:
            out[s[len(path)]] = out.get(s[len(path)], 0) + 1
    return out


def _ref_match(seqs, depth, ctx):
    for n in range(min(len(ctx), depth - 1), 0, -1):
        if _ref_continuations(seqs, depth, ctx[len(ctx) - n:]):
            return n
    return 0


# ---------------------------------------------------------------- SuffixTree

def test_match_returns_longest_suffix_with_a_continuation():
    t = SuffixTree(max_depth=8)
    t.add([1, 2, 3, 4, 5])
    t.add([9, 2, 3, 4, 7])
    node, n = t.match([8, 8, 2, 3, 4])
    assert n == 3 and node.count == 2 and node.depth >= 3
    node, n = t.match([0, 1, 2, 3])
    assert n == 3 and node.count == 1
    assert t.match([6, 6])[1] == 0
    # "3 4 5" occurs only at the end of a sequence: it predicts nothing, so it is no match ...
    assert t.match([0, 3, 4, 5])[1] == 0
    t.add([3, 4, 5, 6])
    # ... until it occurs with a continuation.
    assert t.match([0, 3, 4, 5])[1] == 3
    # Matches are at most max_depth - 1 tokens (a continuation must fit in max_depth).
    t2 = SuffixTree(max_depth=4)
    t2.add(list(range(10)))
    assert t2.match([0, 1, 2, 3, 4, 5])[1] == 3


def test_propose_follows_the_most_frequent_continuation():
    t = SuffixTree(max_depth=16)
    for head, tail in [(10, [4, 6]), (11, [4, 6]), (12, [4, 8]), (13, [5])]:
        t.add([head, 1, 2, 3] + tail)
    tokens, probs = t.propose([7, 1, 2, 3], max_len=8)
    assert tokens == [4, 6]
    assert probs == pytest.approx([0.75, 2 / 3])
    assert t.continuations([1, 2, 3]) == {4: 3, 5: 1}
    assert t.count([1, 2, 3, 4]) == 3


def test_min_token_prob_stops_the_chain_on_the_cumulative_probability():
    t = SuffixTree(max_depth=16)
    for head, tail in [(10, [4, 6]), (11, [4, 6]), (12, [4, 8]), (13, [5])]:
        t.add([head, 1, 2, 3] + tail)
    assert t.propose([1, 2, 3], 8, min_token_prob=0.5)[0] == [4, 6]  # 0.75, then 0.5
    assert t.propose([1, 2, 3], 8, min_token_prob=0.6)[0] == [4]     # 0.5 < 0.6
    assert t.propose([1, 2, 3], 8, min_token_prob=0.8) == ([], [])
    assert t.propose([1, 2, 3], 1)[0] == [4]


@pytest.mark.parametrize("first", [2, 9])
def test_ties_go_to_the_smaller_token_id(first):
    t = SuffixTree(max_depth=8)
    t.add([1, 2, 3, first])
    t.add([1, 2, 3, 11 - first])
    assert t.propose([1, 2, 3], 4) == ([2], [0.5])


def test_live_tail_does_not_dilute_its_own_continuations():
    t = SuffixTree(max_depth=8)
    t.extend("me", [1, 2, 3, 1, 2])
    node, n = t.match([1, 2, 3, 1, 2])
    assert n == 2  # "3 1 2" occurs only as the tail itself
    tokens, probs = t.propose([1, 2, 3, 1, 2], 4)
    assert tokens == [3, 1, 2] and probs == [1.0, 1.0, 1.0]
    t.extend("me", [3])
    assert t.continuations([1, 2]) == {3: 2}


def test_drafts_run_past_max_depth_from_a_shorter_suffix():
    t = SuffixTree(max_depth=4)
    t.add(list(range(10)))
    assert t.propose([0, 1, 2], 5)[0] == [3, 4, 5, 6, 7]
    assert t.propose([0, 1, 2], 9)[0] == [3, 4, 5, 6, 7, 8, 9]  # up to the end of the sequence
    assert t.propose([0, 1, 2], 1)[0] == [3]
    t.add([5, 6, 7, 1, 1])  # "5 6 7" goes on with 8 or 1: a tie, to the smaller token id
    tokens, probs = t.propose([0, 1, 2], 6)
    assert tokens == [3, 4, 5, 6, 7, 1] and probs[-1] == 0.5


def test_random_sequences_match_a_brute_force_index():
    rng = random.Random(1)
    for _ in range(60):
        depth, vocab = rng.choice([2, 3, 5, 8]), rng.choice([2, 3, 5])
        t = SuffixTree(depth)
        seqs, live = {}, []
        for op in range(20):
            r = rng.random()
            if r < 0.3:
                toks = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
                seqs[t.add(toks)] = toks
            elif r < 0.75:
                if live and rng.random() < 0.7:
                    key = rng.choice(live)
                    new = [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
                    t.extend(key, new)
                    seqs[key].extend(new)
                else:
                    key = ("live", op)
                    seqs[key] = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
                    t.extend(key, list(seqs[key]))
                    live.append(key)
            elif seqs:
                key = t.pop_oldest()
                assert key == next(iter(seqs))
                del seqs[key]
                if key in live:
                    live.remove(key)
            t._validate()
            stored = list(seqs.values())
            assert t.num_tokens == sum(map(len, stored))
            for _ in range(8):
                path = [rng.randrange(vocab) for _ in range(rng.randint(0, depth - 1))]
                assert t.count(path) == _ref_count(stored, depth, path)
                assert t.continuations(path) == _ref_continuations(stored, depth, path)
                ctx = [rng.randrange(vocab) for _ in range(rng.randint(0, 10))]
                assert t.match(ctx)[1] == _ref_match(stored, depth, ctx)
    while t.num_sequences:
        t.pop_oldest()
    t._validate()
    assert t.num_nodes == 1 and t.root.count == 0


def test_removed_live_sequences_that_labels_point_into_are_kept_until_unused():
    # A live sequence that grows after a newer one was stored may still label nodes of the newer
    # strings once it is removed: its tokens stay until a scan finds no label pointing there.
    rng = random.Random(7)
    t = SuffixTree(max_depth=6)
    for i in range(400):
        t.extend(i, [rng.randrange(3) for _ in range(10)])
        if i:
            t.extend(i - 1, [rng.randrange(3) for _ in range(20)])  # grows after i was stored
            t.finish(i - 1)
        if t.num_sequences > 3:
            t.pop_oldest()
    t._validate()
    assert t._kept and len(t._tok) < 200  # of 400: scans dropped the unused ones again
    fresh = SuffixTree(max_depth=6)
    fresh.load_state_dict(t.state_dict())
    assert fresh.num_nodes == t.num_nodes
    for _ in range(200):
        ctx = [rng.randrange(3) for _ in range(rng.randint(1, 8))]
        assert t.propose(ctx, 8) == fresh.propose(ctx, 8)
        assert t.continuations(ctx[:5]) == fresh.continuations(ctx[:5])


def test_tree_state_dict_round_trip_keeps_live_sequences_growing():
    rng = random.Random(2)
    t = SuffixTree(max_depth=6)
    for _ in range(5):
        t.add([rng.randrange(4) for _ in range(30)])
    t.extend("live", [rng.randrange(4) for _ in range(10)])
    u = SuffixTree()
    u.load_state_dict(json.loads(json.dumps(t.state_dict())))
    more = [rng.randrange(4) for _ in range(10)]
    t.extend("live", more)
    u.extend("live", more)
    u._validate()
    assert u.num_nodes == t.num_nodes and u.num_tokens == t.num_tokens
    for _ in range(50):
        ctx = [rng.randrange(4) for _ in range(rng.randint(1, 8))]
        assert u.propose(ctx, 6) == t.propose(ctx, 6)


def test_tree_extend_costs_well_under_a_millisecond_per_token():
    rng = random.Random(3)
    base = [rng.randrange(32000) for _ in range(3000)]

    def rollout(n):  # new tokens mixed with long copies of `base`, like rollouts of one prompt
        out = []
        while len(out) < n:
            if rng.random() < 0.7:
                j = rng.randrange(len(base) - 64)
                out.extend(base[j:j + rng.randint(8, 64)])
            else:
                out.append(rng.randrange(32000))
        return out[:n]

    t = SuffixTree(max_depth=64)
    for _ in range(8):
        t.add(rollout(2000))
    live = rollout(2000)
    start = time.perf_counter()
    for tok in live:
        t.extend("live", (tok,))
    mean = (time.perf_counter() - start) / len(live)
    assert t.num_tokens == 18000
    assert mean < 0.5e-3, f"extend took {mean * 1e6:.0f} us per token"


def test_the_index_gives_the_garbage_collector_almost_nothing_to_track():
    # A full collection walks every tracked object: nodes are ids into flat lists of ints and child
    # dicts hold only ints (untracked by CPython), so the trees add ~no tracked object per token.
    rng = random.Random(6)
    phrases = [[rng.randrange(500) for _ in range(rng.randint(3, 12))] for _ in range(40)]

    def text(n):
        out = []
        while len(out) < n:
            out += rng.choice(phrases) if rng.random() < 0.6 else [rng.randrange(500)]
        return out[:n]

    seqs = [text(2500) for _ in range(8)]
    live = text(1500)
    gc.collect()
    before = len(gc.get_objects())
    t = SuffixTree(max_depth=64)
    for s in seqs:
        t.add(s)
    t.extend("live", live[:500])
    for tok in live[500:]:
        t.extend("live", (tok,))
    t.pop_oldest()
    t.add(text(2500))
    added = len(gc.get_objects()) - before
    assert t.num_tokens == 8 * 2500 + 1500 and t.num_nodes > t.num_tokens
    assert added / t.num_tokens < 0.05, f"{added / t.num_tokens:.2f} tracked objects per token"
    children = [ch for ch in t._kid if ch]
    assert len(children) > 1000 and not any(gc.is_tracked(ch) for ch in children)
    t._validate()


# ---------------------------------------------------------------- SuffixDrafter

def test_draft_is_bounded_by_alpha_times_match_length_and_cap():
    def drafter(**kw):
        d = SuffixDrafter(SuffixConfig(**kw))
        d.add_rollout("g", range(100))
        return d

    ctx = [1000, 5, 6, 7]  # matches "5 6 7": 3 tokens
    assert drafter().propose(None, "g", ctx).tokens == [8, 9, 10]
    assert drafter(alpha=2.0).propose(None, "g", ctx).tokens == [8, 9, 10, 11, 12, 13]
    assert drafter(alpha=0.5).propose(None, "g", ctx).tokens == [8]
    assert drafter(alpha=0.3).propose(None, "g", ctx).tokens == []
    long_ctx = list(range(30))  # matches 30 tokens
    d = drafter(cap=16)
    draft = d.propose(None, "g", long_ctx)
    assert draft.tokens == list(range(30, 46)) and draft.match_len == 30
    assert draft.source == "window" and draft.score == pytest.approx(16.0)
    assert d.propose(None, "g", long_ctx, max_len=5).tokens == [30, 31, 32, 33, 34]
    assert drafter(cap=4).propose(None, "g", long_ctx).tokens == [30, 31, 32, 33]


def test_drafter_probabilities_and_min_token_prob():
    d = SuffixDrafter(SuffixConfig(alpha=4.0, min_token_prob=0.6))
    for tail in ([4, 6], [4, 6], [4, 8], [5]):
        d.add_rollout("g", [1, 2, 3] + tail)
    draft = d.propose(None, "g", [9, 1, 2, 3])
    assert draft.tokens == [4] and draft.probs == [0.75]
    d.config.min_token_prob = 0.5
    draft = d.propose(None, "g", [9, 1, 2, 3])
    assert draft.tokens == [4, 6] and draft.score == pytest.approx(0.75 + 0.5)


def test_the_best_scoring_source_wins():
    d = SuffixDrafter(SuffixConfig(alpha=1.0, min_token_prob=0.0))
    d.add_rollout("g", [1, 2, 3, 4, 5, 6, 7, 8])
    d.add_request("r", "g", [50])
    d.update("r", [2, 3, 9, 2, 3, 10])
    # "2 3": the window continues with 4 5 for sure, the own output with 9 or 10.
    draft = d.propose("r", "g", [50, 2, 3, 9, 2, 3, 10, 2, 3])
    assert draft.source == "window" and draft.tokens == [4, 5] and draft.score == 2.0
    # A longer match in the own output (and so a longer draft) beats the window.
    d.update("r", [20, 1, 2, 3, 11, 12, 13, 14, 15, 20])
    ctx = [50, 2, 3, 9, 2, 3, 10, 20, 1, 2, 3, 11, 12, 13, 14, 15, 20, 1, 2, 3]
    draft = d.propose("r", "g", ctx)
    assert draft.source == "own" and draft.match_len == 4 and draft.tokens == [11, 12, 13, 14]
    d.abort_request("r")
    d.end_step()  # without the request and its group, the window's 3-token match is left
    assert d.propose(None, "g", ctx).tokens == [4, 5, 6]
    # On equal scores and match lengths the own output comes first.
    e = SuffixDrafter()
    e.add_rollout("g", [1, 2, 3, 4])
    e.add_request("r", "g", [1, 2, 3, 4])
    assert e.propose("r", "g", [1, 2, 3, 4, 7, 1, 2]).source == "own"


def test_window_evicts_rollouts_older_than_window_steps():
    d = SuffixDrafter(SuffixConfig(window_steps=4))
    d.start_step(0)
    d.add_request("r0", "g", [100, 101])
    d.update("r0", [1, 2, 3, 4, 5, 6])
    d.finish_request("r0")
    d.end_step()  # step 0's rollout is used in steps 1 .. 4
    for step in range(1, 5):
        assert d.step == step
        assert d.propose(None, "g", [9, 2, 3, 4]).tokens == [5, 6], step
        assert d.expected_length("g") == 6.0
        d.end_step()
    assert d.step == 5
    assert d.propose(None, "g", [9, 2, 3, 4]).tokens == []
    assert d.expected_length("g") is None and d.num_prompts == 0
    # start_step jumps ahead and evicts the same way.
    d.add_rollout("h", [1, 2, 3, 4, 5, 6])  # step 5
    d.start_step(9)
    assert d.propose(None, "h", [2, 3, 4]).tokens == [5, 6]
    d.start_step(10)
    assert d.propose(None, "h", [2, 3, 4]).tokens == []


def test_expected_length_is_the_mean_over_the_window():
    d = SuffixDrafter(SuffixConfig(window_steps=2, max_tokens_per_prompt=8))
    assert d.expected_length("g") is None
    d.add_rollout("g", range(10), step=0)
    d.add_rollout("g", range(20), step=1)
    d.add_rollout("g", range(30), step=2)
    d.start_step(2)  # the window is steps 0 and 1 (and what step 2 added so far)
    assert d.expected_length("g") == 20.0
    d.start_step(3)  # step 0 leaves the window; lengths do not depend on the token cap
    assert d.expected_length("g") == 25.0 and d.stored_tokens("g") == 8


def test_least_recently_used_prompt_is_evicted_first():
    d = SuffixDrafter(SuffixConfig(max_prompts=2))
    d.add_rollout("a", [1, 2, 3, 4])
    d.add_rollout("b", [1, 2, 3, 5])
    d.end_step()
    d.add_request("r", "a", [0])  # using "a" makes "b" the least recently used
    d.end_step()
    d.add_rollout("c", [1, 2, 3, 6])
    assert d.prompts() == ["a", "c"] and d.num_prompts == 2
    assert d.propose(None, "b", [1, 2, 3]).tokens == []
    assert d.propose(None, "a", [1, 2, 3]).tokens == [4]
    assert d.propose(None, "c", [1, 2, 3]).tokens == [6]
    d.add_rollout("d", [7, 8, 9])
    assert d.prompts() == ["c", "d"]


def test_sibling_live_outputs_are_used_within_the_step():
    d = SuffixDrafter()
    prompt = [100, 101, 102]
    for r in ("r1", "r2", "r3"):
        d.add_request(r, "g", prompt)
    d.add_request("x", "other", prompt)
    d.update("r1", [5, 6, 7, 8, 9])
    d.update("r1", [10])
    draft = d.propose("r2", "g", prompt + [5, 6])
    assert draft.tokens == [7, 8] and draft.source == "siblings" and draft.match_len == 2
    assert d.propose("x", "other", prompt + [5, 6]).tokens == []  # another prompt's group
    # The prompt itself is in the group's index: a sample that copies it gets drafts.
    assert d.propose("r3", "g", [100, 101]).tokens == [102]
    d.update("r2", [5, 6])
    d.finish_request("r1")
    assert d.propose("r2", "g", prompt + [5, 6]).tokens == [7, 8]  # r1's output stays this step
    d.end_step()
    # r1 finished: its output is in the window now; r2 was still running and is dropped.
    d.add_request("r4", "g", prompt)
    draft = d.propose("r4", "g", prompt + [5, 6])
    assert draft.source == "window" and draft.tokens == [7, 8]
    assert d.stored_tokens("g") == 6
    assert d.live_tokens("g") == 3


def test_own_output_is_a_source():
    d = SuffixDrafter(SuffixConfig(alpha=2.0))
    d.add_request("r", "g", [1, 2])
    d.update("r", [40, 41, 42, 43, 7, 40, 41])
    draft = d.propose("r", "g", [1, 2, 40, 41, 42, 43, 7, 40, 41])
    assert draft.tokens == [42, 43, 7, 40] and draft.source == "own" and draft.match_len == 2


def test_memory_caps_bound_the_stored_tokens():
    d = SuffixDrafter(SuffixConfig(max_tokens_per_prompt=10))
    d.add_rollout("g", [1, 2, 3, 4, 5, 6])
    assert d.stored_tokens("g") == 6
    d.add_rollout("g", [11, 12, 13, 14, 15, 16])  # 12 > 10: the oldest rollout goes
    assert d.stored_tokens("g") == 6
    assert d.propose(None, "g", [2, 3]).tokens == []
    assert d.propose(None, "g", [12, 13]).tokens == [14, 15]
    d.add_rollout("g", range(20, 45))  # longer than the cap alone: its first 10 tokens are kept
    assert d.stored_tokens("g") == 10 and d.stored_tokens() == 10
    assert d.propose(None, "g", [27, 28]).tokens == [29]
    assert d.propose(None, "g", [12, 13]).tokens == []
    assert d.expected_length("g") == pytest.approx((6 + 6 + 25) / 3)
    # The group's per-step index stops growing at the cap too.
    d.add_request("r", "g", [100, 101])
    d.update("r", range(50, 70))
    assert d.live_tokens("g") == 10
    assert d.propose("r", "g", [0, 55, 56]).tokens == [57, 58]  # own index is not capped
    d.end_step()
    assert d.stored_tokens("g") == 10


@pytest.mark.parametrize("seed", range(3))
def test_deferred_window_work_gives_the_windows_of_immediate_indexing(seed):
    # Recording only queues a rollout; its tree catches up when a draft reads it or a unit at a
    # time in index_some. Whatever the order, each window must hold exactly what indexing at once
    # would keep: the newest rollouts within the step window and the token cap.
    rng = random.Random(seed)
    cfg = dict(window_steps=3, max_tokens_per_prompt=40, max_depth=8, min_token_prob=0.0)
    eager, lazy, units = SuffixDrafter(SuffixConfig(**cfg)), SuffixDrafter(SuffixConfig(**cfg)), 0
    kept = {g: [] for g in "abc"}  # (step, tokens) of every rollout, to derive the window from
    for step in range(12):
        for g in rng.sample("abc", rng.randint(0, 3)):
            for _ in range(rng.randint(1, 3)):
                out = [rng.randrange(6) for _ in range(rng.randint(1, 30))]
                kept[g].append((eager.step, out))
                for d in (eager, lazy):
                    d.add_rollout(g, out)
        while eager.index_some():
            units += 1
        nxt = eager.step + rng.choice([1, 1, 1, 2])  # steps may jump ahead
        for d in (eager, lazy):
            d.start_step(nxt)
        while eager.index_some():
            units += 1
        if rng.random() < 0.3:
            while lazy.index_some():
                pass
        for g in "abc":
            # lazy has not caught up: its queue is bounded by the cap all the same
            h = lazy._prompts.get(g)
            assert h is None or sum(len(t) for _, t in h.queued) <= cfg["max_tokens_per_prompt"]
            window, total = [], 0
            for s, out in reversed(kept[g]):
                if s < eager.step - cfg["window_steps"]:
                    break
                total += len(out[:40])
                if total > 40:
                    break
                window.insert(0, out[:40])
            ctx = [rng.randrange(6) for _ in range(4)]
            assert lazy.propose(None, g, ctx) == eager.propose(None, g, ctx)
            got = eager._prompts[g].tree.sequences() if g in eager._prompts else []
            assert got == window
            assert lazy.expected_length(g) == eager.expected_length(g)
    assert units > 0
    assert lazy.state_dict() == eager.state_dict()


def test_state_dict_round_trip_gives_identical_proposals():
    rng = random.Random(4)
    cfg = SuffixConfig(window_steps=3, max_depth=16, alpha=2.0, min_token_prob=0.05,
                       max_tokens_per_prompt=300, max_prompts=4)
    d = SuffixDrafter(cfg)
    words = [[rng.randrange(50) for _ in range(rng.randint(2, 6))] for _ in range(20)]

    def rollout():
        return [t for _ in range(rng.randint(5, 25)) for t in rng.choice(words)]

    for step in range(6):
        d.start_step(step)
        for g in rng.sample(range(6), 3):
            for i in range(3):
                d.add_request((step, g, i), g, [g, g + 1])
                d.update((step, g, i), rollout())
                d.finish_request((step, g, i))
    e = SuffixDrafter(cfg)
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert e.step == d.step and e.prompts() == d.prompts()
    assert [e.stored_tokens(g) for g in range(6)] == [d.stored_tokens(g) for g in range(6)]
    d.end_step()
    e.end_step()
    assert e.prompts() == d.prompts() and len(d.prompts()) == 4
    drafted = 0
    for g in range(6):
        assert e.expected_length(g) == d.expected_length(g)
        for _ in range(30):
            ctx = rollout()[:rng.randint(1, 40)]
            a, b = d.propose(None, g, ctx), e.propose(None, g, ctx)
            assert (a.tokens, a.probs, a.source, a.match_len) == \
                (b.tokens, b.probs, b.source, b.match_len)
            drafted += len(a)
    assert drafted > 0
    for _ in range(3):  # the restored windows age the same way
        d.end_step()
        e.end_step()
        assert e.prompts() == d.prompts()
        assert [e.stored_tokens(g) for g in range(6)] == [d.stored_tokens(g) for g in range(6)]


def test_drafter_update_costs_well_under_a_millisecond():
    rng = random.Random(5)
    d = SuffixDrafter(SuffixConfig(max_depth=64))
    base = [rng.randrange(32000) for _ in range(2000)]
    for step in range(4):
        d.add_rollout("g", base[:1500] + [rng.randrange(32000) for _ in range(500)], step=step)
    d.start_step(4)
    prompt = [rng.randrange(32000) for _ in range(500)]
    for r in range(4):
        d.add_request(r, "g", prompt)
    toks = base[:1000] + [rng.randrange(32000) for _ in range(1000)]
    start = time.perf_counter()
    for i, tok in enumerate(toks):  # 2,000 request-steps over 4 live siblings
        d.update(i % 4, [tok])
    mean = (time.perf_counter() - start) / len(toks)
    assert d.live_tokens("g") == len(prompt) + len(toks)
    assert mean < 0.5e-3, f"update took {mean * 1e6:.0f} us per request-step"


def test_registering_with_a_backlog_equals_feeding_the_tokens_one_by_one():
    rng = random.Random(5)
    prompt = [rng.randrange(6) for _ in range(10)]
    outs = {k: [rng.randrange(6) for _ in range(rng.randint(0, 80))] for k in ("a", "b", "c")}
    cfg = SuffixConfig(max_depth=8, live_max_depth=8)
    fed, bulk = SuffixDrafter(cfg), SuffixDrafter(cfg)
    for k, out in outs.items():
        fed.add_request(k, "g", prompt)
        for t in out:
            fed.update(k, [t])
        bulk.add_request(k, "g", prompt, out)
    for k in outs:
        for cut in range(0, 40, 3):
            ctx = prompt + outs[k][:cut]
            assert fed.propose(k, "g", ctx) == bulk.propose(k, "g", ctx)
    fed.update("a", [1, 2])
    bulk.update("a", [1, 2])
    assert fed.propose("a", "g", prompt + outs["a"] + [1, 2]) == bulk.propose("a", "g", prompt + outs["a"] + [1, 2])
    assert fed.live_tokens("g") == bulk.live_tokens("g")


def test_live_outputs_are_indexed_to_live_max_depth_and_windows_to_max_depth():
    pattern = list(range(10, 22))
    ctx = [1, 2] + pattern[:8]
    cfg = SuffixConfig(max_depth=16, live_max_depth=4, alpha=8.0, cap=16, min_token_prob=0.0)
    live = SuffixDrafter(cfg)
    live.add_request("r", "g", [1, 2])
    live.update("r", pattern)
    draft = live.propose("r", "g", ctx)
    assert draft.source in ("own", "siblings") and draft.match_len == 3  # live trees hold suffixes of <= 4
    assert draft.tokens == pattern[8:]  # the draft still runs past the live depth
    window = SuffixDrafter(cfg)
    window.add_rollout("g", pattern)
    window.add_request("r", "g", [1, 2])
    draft = window.propose("r", "g", ctx)
    assert draft.source == "window" and draft.match_len == 8 and draft.tokens == pattern[8:]
    with pytest.raises(ValueError, match="live_max_depth"):
        SuffixConfig(live_max_depth=1)
