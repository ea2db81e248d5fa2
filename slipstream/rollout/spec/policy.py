"""When and how much to speculate: a per-batch-size bandit over draft lengths, scaled per prompt.

Speculative decoding pays off when decoding is memory-bound, i.e. at small live batch sizes; a
large batch is compute-bound and verification of drafted tokens mostly costs time. During an RL
rollout phase the live batch drains from its full size down to a long tail of a few requests
(the longest generations), so the best draft length changes during one step. `SpecPolicy`
decides, every engine step, each live request's draft budget (the most tokens its drafter may
propose), combining:

* a switch: no speculation at all while the live batch is at least ``min_batch_for_off``;
* an epsilon-greedy bandit per live-batch bucket over candidate draft lengths (the arms), whose
  reward is the measured wall-clock throughput (generated tokens per second) of steps run under
  the arm, in the manner of the adaptive drafting of TLT (arXiv 2511.16665). Every arm of a
  bucket is tried once (arm 0, no speculation, first, so a baseline exists) before exploiting;
* a guard: an arm whose mean throughput is more than ``guard_margin`` (3%) below that of arm 0
  in the same bucket is never exploited, only explored, so once measured a bucket is never run
  greedily slower than plain decoding by more than that margin;
* exploration priced by what it costs: an arm measured slower than arm 0 (its steps take
  1 + s times as long) is explored only ``explore_cost / (epsilon * s)`` as often as uniform
  exploration would, so exploring all the slower arms of a bucket together costs at most
  ``explore_cost`` (1%) of arm 0's throughput in expectation. Uniform epsilon-greedy would not
  keep the guard's promise: with five arms and epsilon 0.1, a drafting arm at a third of arm 0's
  speed is played in 2% of the steps and alone costs 4% of the bucket's time;
* distribution-aware budgets (DASD, arXiv 2511.13841): prompts whose history says they produce
  long rollouts get larger budgets. Prompts are put into ``num_length_classes`` classes by
  ranking their expected lengths (`set_expected_lengths`, e.g. from
  `SuffixDrafter.expected_length`); the longest class gets ``round(L * long_boost)``, the
  shortest ``max(1, L // 2)``, the others (and prompts with no history, which go to the middle
  class) the arm's length L; every budget is capped by ``max(draft_lens)``;
* a per-step cap on the drafted tokens of all requests together: when the budgets sum to more
  than ``max_step_draft_tokens`` they are scaled down proportionally (floor of each budget times
  cap / sum, the leftover tokens going one each to the largest remainders, ties to the longer
  class then to the earlier request), so the sum is exactly the cap and the order of budgets
  between classes is kept.

Usage per engine step::

    policy.set_expected_lengths({g: drafter.expected_length(g) for g in groups})
    budgets = policy.plan([(key, group_id), ...], live_batch)
    ... draft with the budgets, verify, time the step ...
    policy.record(live_batch, policy.arm_for(live_batch), generated_tokens, seconds)
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PolicyConfig", "SpecPolicy"]


@dataclass
class PolicyConfig:
    """Parameters of `SpecPolicy`.

    min_batch_for_off: no speculation while the live batch is at least this. bucket_edges: lower
    edges of the live-batch buckets (a batch goes to the largest edge not above it, or the
    smallest edge). draft_lens: the bandit's arms (0 = no speculation; added if missing).
    max_step_draft_tokens: cap on the drafted tokens of one step, all requests together.
    long_boost: budget multiplier of the longest length class. num_length_classes: classes of
    prompts by expected rollout length. epsilon: exploration probability. guard_margin: an arm
    more than this fraction slower than arm 0 is not exploited. explore_cost: the most that
    exploring arms measured slower than arm 0 may cost, as a fraction of arm 0's throughput (None:
    every arm explored alike, whatever it costs). seed: of the exploration RNG.
    """

    min_batch_for_off: int = 32
    bucket_edges: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    draft_lens: tuple[int, ...] = (0, 2, 4, 8, 16)
    max_step_draft_tokens: int = 128
    long_boost: float = 2.0
    num_length_classes: int = 3
    epsilon: float = 0.1
    guard_margin: float = 0.03
    explore_cost: float | None = 0.01
    seed: int = 0

    def __post_init__(self):
        self.bucket_edges = tuple(sorted({int(e) for e in self.bucket_edges}))
        lens = {int(n) for n in self.draft_lens}
        lens.add(0)
        self.draft_lens = tuple(sorted(lens))
        if not self.bucket_edges:
            raise ValueError("bucket_edges must not be empty")
        if self.draft_lens[0] < 0:
            raise ValueError(f"draft_lens must be >= 0, got {self.draft_lens}")
        if self.max_step_draft_tokens < 0:
            raise ValueError(
                f"max_step_draft_tokens must be >= 0, got {self.max_step_draft_tokens}")
        if self.long_boost < 0:
            raise ValueError(f"long_boost must be >= 0, got {self.long_boost}")
        if self.num_length_classes < 1:
            raise ValueError(f"num_length_classes must be >= 1, got {self.num_length_classes}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.guard_margin < 1.0:
            raise ValueError(f"guard_margin must be in [0, 1), got {self.guard_margin}")
        if self.explore_cost is not None and not 0.0 <= self.explore_cost <= 1.0:
            raise ValueError(f"explore_cost must be in [0, 1] or None, got {self.explore_cost}")


class SpecPolicy:
    """Per-step draft budgets for live requests; see the module docstring."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config if config is not None else PolicyConfig()
        self._rng = random.Random(self.config.seed)
        # bucket edge -> arm -> [count, mean tokens/s]
        self._stats: dict[int, dict[int, list[float]]] = {
            e: {a: [0, 0.0] for a in self.config.draft_lens} for e in self.config.bucket_edges}
        self._last_arm: dict[int, int] = {}
        self._expected: dict[Hashable, float] = {}
        self._classes: dict[Hashable, int] = {}

    # ---------------------------------------------------------------- buckets and the bandit

    def bucket(self, live_batch: int) -> int:
        """The bucket (its lower edge) of a live batch size."""
        edges = self.config.bucket_edges
        i = bisect.bisect_right(edges, live_batch) - 1
        return edges[max(i, 0)]

    def stats(self, live_batch: int) -> dict[int, tuple[int, float]]:
        """Arm -> (recorded steps, mean tokens/s) in the live batch's bucket."""
        return {a: (int(c), m) for a, (c, m) in self._stats[self.bucket(live_batch)].items()}

    def exploitable_arms(self, live_batch: int) -> list[int]:
        """Arms the bucket may pick greedily: arm 0 and every measured arm whose mean is within
        ``guard_margin`` of arm 0's (all measured arms while arm 0 has no measurement)."""
        st = self._stats[self.bucket(live_batch)]
        c0, m0 = st[0]
        floor = (1.0 - self.config.guard_margin) * m0 if c0 else -math.inf
        return [a for a, (c, m) in st.items() if a == 0 or (c and m >= floor)]

    def greedy_arm(self, live_batch: int) -> int:
        """The exploited arm: the exploitable arm of highest mean throughput (ties: shorter)."""
        st = self._stats[self.bucket(live_batch)]
        return max(self.exploitable_arms(live_batch), key=lambda a: (st[a][1], -a))

    def _choose(self, b: int) -> int:
        st = self._stats[b]
        for a in self.config.draft_lens:  # sorted, so arm 0 comes first
            if not st[a][0]:
                return a
        if self._rng.random() < self.config.epsilon:
            arm = self._rng.choice(self.config.draft_lens)
            if self._rng.random() < self.exploration_keep(b, arm):
                return arm
        return self.greedy_arm(b)

    def exploration_keep(self, live_batch: int, arm: int) -> float:
        """The probability that an exploration draw of `arm` in this live batch's bucket is played
        (else the greedy arm is): 1 unless the arm is measured slower than arm 0, else
        ``explore_cost / (epsilon * s)`` (at most 1) where its steps take 1 + s times arm 0's."""
        st = self._stats[self.bucket(live_batch)]
        (c0, m0), (ca, ma) = st[0], st[arm]
        if self.config.explore_cost is None or not (c0 and ca) or ma >= m0:
            return 1.0
        if ma <= 0.0:
            return 0.0
        slowdown = m0 / ma - 1.0
        return min(1.0, self.config.explore_cost / (self.config.epsilon * slowdown))

    def arm_for(self, live_batch: int) -> int:
        """The arm (max draft length) the last `plan` used for this live batch's bucket; 0 at or
        above ``min_batch_for_off``. Chooses one (as `plan` would) if the bucket has no plan."""
        if live_batch >= self.config.min_batch_for_off:
            return 0
        b = self.bucket(live_batch)
        if b not in self._last_arm:
            self._last_arm[b] = self._choose(b)
        return self._last_arm[b]

    def choose_arm(self, live_batch: int) -> int:
        """Choose the arm (max draft length) for a step at this live batch, as `plan` does: 0 at
        or above ``min_batch_for_off``, else the bucket's bandit (untried arms first, then
        epsilon-greedy)."""
        if live_batch >= self.config.min_batch_for_off:
            return 0
        b = self.bucket(live_batch)
        self._last_arm[b] = self._choose(b)
        return self._last_arm[b]

    def record(self, live_batch: int, arm_draft_len: int, tokens: int, seconds: float) -> None:
        """Add a step's measured throughput (tokens / seconds) under an arm to its bucket's mean.
        Steps at or above ``min_batch_for_off`` (no bandit there) are ignored."""
        if arm_draft_len not in self._stats[self.config.bucket_edges[0]]:
            raise ValueError(f"unknown arm {arm_draft_len}; arms are {self.config.draft_lens}")
        if tokens < 0 or not seconds > 0:
            raise ValueError(f"need tokens >= 0 and seconds > 0, got {tokens}, {seconds}")
        if live_batch >= self.config.min_batch_for_off:
            return
        s = self._stats[self.bucket(live_batch)][arm_draft_len]
        s[0] += 1
        s[1] += (tokens / seconds - s[1]) / s[0]

    # ---------------------------------------------------------------- length classes

    def set_expected_lengths(self, lengths: Mapping[Hashable, float | None]) -> None:
        """Expected rollout lengths of this step's prompts (None: no history). Replaces the
        previous ones and re-ranks the prompts into length classes."""
        self._expected = {g: float(v) for g, v in lengths.items() if v is not None}
        k = self.config.num_length_classes
        vals = sorted(self._expected.values())
        n = len(vals)
        self._classes = {}
        for g, v in self._expected.items():
            less = bisect.bisect_left(vals, v)
            equal = bisect.bisect_right(vals, v) - less
            pct = (less + 0.5 * equal) / n  # mid-rank percentile, in (0, 1)
            self._classes[g] = min(k - 1, int(pct * k))

    def length_class(self, group_id: Hashable) -> int:
        """0 (shortest) .. num_length_classes - 1 (longest); prompts without history get the
        middle class ((num_length_classes - 1) // 2)."""
        c = self._classes.get(group_id)
        return (self.config.num_length_classes - 1) // 2 if c is None else c

    def budget_for_class(self, base_len: int, cls: int) -> int:
        """A request's budget from the arm's length and its prompt's class (before the step cap)."""
        cfg = self.config
        if base_len <= 0:
            return 0
        k = cfg.num_length_classes
        if k == 1:
            n = base_len
        elif cls >= k - 1:
            n = int(round(base_len * cfg.long_boost))
        elif cls <= 0:
            n = max(1, base_len // 2)
        else:
            n = base_len
        return max(0, min(n, cfg.draft_lens[-1]))

    # ---------------------------------------------------------------- plans

    def plan(self, requests: Iterable[tuple[Hashable, Hashable]], live_batch: int, arm: int | None = None
             ) -> dict[Hashable, int]:
        """Draft budget of each live (request_key, group_id) for this step, under `arm` if given
        (one `choose_arm` already drew for this step), else under an arm drawn now."""
        requests = list(requests)
        cfg = self.config
        if live_batch >= cfg.min_batch_for_off:
            return {key: 0 for key, _ in requests}
        if arm is None:
            base = self.choose_arm(live_batch)
        else:
            base = self._last_arm[self.bucket(live_batch)] = arm
        classes = [self.length_class(g) for _, g in requests]
        budgets = [self.budget_for_class(base, c) for c in classes]
        total = sum(budgets)
        cap = cfg.max_step_draft_tokens
        if total > cap:
            scaled = [n * cap // total for n in budgets]
            left = cap - sum(scaled)
            order = sorted(range(len(budgets)),
                           key=lambda i: (-(budgets[i] * cap % total), -classes[i], i))
            for i in order[:left]:
                scaled[i] += 1
            budgets = scaled
        return {key: n for (key, _), n in zip(requests, budgets)}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Bandit statistics, last arms, RNG state and expected lengths as JSON-safe data (the
        expected lengths only when group ids are JSON-safe)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": 1,
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in asdict(self.config).items()},
            "stats": {str(b): {str(a): [int(c), float(m)] for a, (c, m) in st.items()}
                      for b, st in self._stats.items()},
            "last_arm": {str(b): a for b, a in self._last_arm.items()},
            "rng": [version, list(internal), gauss],
            "expected": [[g, v] for g, v in self._expected.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`. Statistics of buckets and arms the current config lacks are
        dropped; those it adds start empty."""
        self._stats = {e: {a: [0, 0.0] for a in self.config.draft_lens}
                       for e in self.config.bucket_edges}
        for b, st in state["stats"].items():
            b = int(b)
            if b not in self._stats:
                continue
            for a, (c, m) in st.items():
                a = int(a)
                if a in self._stats[b]:
                    self._stats[b][a] = [int(c), float(m)]
        self._last_arm = {int(b): int(a) for b, a in state.get("last_arm", {}).items()
                          if int(b) in self._stats and int(a) in self.config.draft_lens}
        rng = state.get("rng")
        if rng is not None:
            self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.set_expected_lengths({(tuple(g) if isinstance(g, list) else g): v
                                   for g, v in state.get("expected", [])})
