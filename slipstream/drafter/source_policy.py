"""Which drafter speculates, per live-batch bucket: none, the suffix tree, the learned drafter, or both.

`SourcePolicy` is the bandit of `slipstream.rollout.spec.policy.SpecPolicy` with the draft sources
as its arms: per live-batch bucket, every source is tried once ("none" first, the baseline), then
the best measured throughput (generated tokens per second of the steps run with that source) is
exploited with epsilon exploration, and a source measured more than `guard_margin` slower than
"none" in a bucket is never exploited there. The draft length stays `SpecPolicy`'s business; the
two compose: the length policy gives each request its budget, this one says who fills it.

"both" drafts with the two and keeps, per request, the draft with the higher expected number of
accepted tokens (`combine_drafts`): the suffix tree's score (the sum of the cumulative path
probabilities of its counts) against the learned drafter's own estimate (the sum of the
cumulative products of q at its tokens), each over the request's budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.drafter.model import Draft
from slipstream.rollout.spec.policy import PolicyConfig, SpecPolicy
from slipstream.rollout.spec.suffix_tree import SuffixDraft

__all__ = ["SOURCES", "CombinedDraft", "SourcePolicy", "SourcePolicyConfig", "combine_drafts"]

SOURCES = ("none", "suffix", "drafter", "both")


@dataclass
class SourcePolicyConfig:
    """sources: the arms, "none" first (the baseline the guard compares with); the rest as in
    `PolicyConfig` (no speculation at or above min_batch_for_off, bucket lower edges,
    exploration probability, guard margin, exploration cost, RNG seed)."""

    sources: tuple[str, ...] = SOURCES
    min_batch_for_off: int = 32
    bucket_edges: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    epsilon: float = 0.1
    guard_margin: float = 0.03
    explore_cost: float | None = 0.01
    seed: int = 0

    def __post_init__(self):
        self.sources = tuple(self.sources)
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or len(set(self.sources)) != len(self.sources) or self.sources[:1] != ("none",):
            raise ValueError(f"sources must be distinct names from {', '.join(SOURCES)} starting with 'none', "
                             f"got {list(self.sources)}")


class SourcePolicy:
    """Per-step choice of the draft source; `record` each step's measured throughput under it."""

    def __init__(self, config: SourcePolicyConfig | None = None):
        self.config = c = config if config is not None else SourcePolicyConfig()
        self._bandit = SpecPolicy(PolicyConfig(min_batch_for_off=c.min_batch_for_off, bucket_edges=c.bucket_edges,
                                               draft_lens=tuple(range(len(c.sources))), epsilon=c.epsilon,
                                               guard_margin=c.guard_margin, explore_cost=c.explore_cost,
                                               seed=c.seed))

    def choose(self, live_batch: int) -> str:
        """The source for this step ("none" at or above min_batch_for_off)."""
        self._bandit.plan((), live_batch)  # draws the bucket's arm for this step
        return self.config.sources[self._bandit.arm_for(live_batch)]

    def record(self, live_batch: int, source: str, tokens: int, seconds: float) -> None:
        """A step's generated tokens and wall time under `source`."""
        if source not in self.config.sources:
            raise ValueError(f"unknown source {source!r}; sources are {list(self.config.sources)}")
        self._bandit.record(live_batch, self.config.sources.index(source), tokens, seconds)

    def bucket(self, live_batch: int) -> int:
        """The bucket (its lower edge) of a live batch size."""
        return self._bandit.bucket(live_batch)

    def greedy(self, live_batch: int) -> str:
        """The source exploited in this bucket (the best measured one the guard allows)."""
        return self.config.sources[self._bandit.greedy_arm(live_batch)]

    def stats(self, live_batch: int) -> dict[str, tuple[int, float]]:
        """Source -> (steps recorded, mean tokens/s) in the live batch's bucket."""
        return {self.config.sources[a]: v for a, v in self._bandit.stats(live_batch).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sources": list(self.config.sources), "bandit": self._bandit.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["sources"]) != self.config.sources:
            raise ValueError(f"saved source policy has sources {state['sources']}, this one "
                             f"{list(self.config.sources)}")
        self._bandit.load_state_dict(state["bandit"])


@dataclass
class CombinedDraft:
    """One step's drafts for B requests, ready for `verify_drafts`.

    tokens [B, K] long, lens [B] long (0: no draft), probs [B, K, V] or None: the learned drafter's
    q for its rows and one-hot rows for suffix drafts (a deterministic draft is q = one-hot), zero
    past each row's length, None when no row came from the learned drafter. sources: per request
    "suffix", "drafter" or None. drafts: the same tokens as host lists, cut to their lengths (what a
    scheduler takes).
    """

    tokens: torch.Tensor
    lens: torch.Tensor
    probs: torch.Tensor | None
    sources: list[str | None]
    drafts: list[list[int]]


def _suffix_score(d: SuffixDraft, n: int) -> float:
    score, cum = 0.0, 1.0
    for p in d.probs[:n]:
        cum *= p
        score += cum
    return score


def combine_drafts(source: str, budgets: Sequence[int], vocab_size: int,
                   suffix: Sequence[SuffixDraft | None] | None = None, drafter: Draft | None = None,
                   device=None) -> CombinedDraft:
    """Per request, the draft of `source` ("both": the higher expected accepted tokens), cut to its budget.

    suffix: one SuffixDraft (or None) per request; drafter: a Draft of the B requests with at
    least max(budgets) tokens, or None. A source whose drafts are missing drafts nothing.
    The learned draft's tokens and scores are read back to the host once; the rest is built on
    the host and copied, and q is assembled with a few device ops whatever B.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; sources are {', '.join(SOURCES)}")
    B = len(budgets)
    if suffix is not None and len(suffix) != B:
        raise ValueError(f"{len(suffix)} suffix drafts for {B} requests")
    if drafter is not None and drafter.tokens.shape[0] != B:
        raise ValueError(f"a learned draft of {drafter.tokens.shape[0]} requests for {B} requests")
    device = drafter.tokens.device if drafter is not None and device is None else device
    K = max(max(budgets, default=0), 1)
    use_suffix = source in ("suffix", "both") and suffix is not None
    use_drafter = source in ("drafter", "both") and drafter is not None
    learned_tokens = learned_scores = None
    K_d = 0
    if use_drafter:
        K_d = drafter.tokens.shape[1]
        both = torch.cat([drafter.tokens.double(), drafter.expected_accepted().double()], dim=1).cpu()
        learned_tokens, learned_scores = both[:, :K_d].long().tolist(), both[:, K_d:].tolist()
    drafts: list[list[int]] = []
    picked: list[str | None] = []
    for b, budget in enumerate(budgets):
        choice, n_s, n_d, best = None, 0, 0, 0.0
        if use_suffix and suffix[b] is not None and budget > 0:
            n_s = min(budget, len(suffix[b]))
            if n_s:
                choice, best = "suffix", _suffix_score(suffix[b], n_s)
        if use_drafter and budget > 0:
            n_d = min(budget, K_d)
            if n_d and (choice is None or learned_scores[b][n_d - 1] > best):
                choice = "drafter"
        picked.append(choice)
        if choice == "suffix":
            drafts.append([int(t) for t in suffix[b].tokens[:n_s]])
        elif choice == "drafter":
            drafts.append(learned_tokens[b][:n_d])
        else:
            drafts.append([])
    tokens = torch.tensor([d + [0] * (K - len(d)) for d in drafts], dtype=torch.long).reshape(B, K).to(device)
    lens = torch.tensor([len(d) for d in drafts], dtype=torch.long).to(device)
    probs = None
    if "drafter" in picked:
        inside = torch.arange(K, device=device)[None, :] < lens[:, None]  # [B, K]
        learned_rows = torch.tensor([c == "drafter" for c in picked]).to(device)
        suffix_rows = torch.tensor([c == "suffix" for c in picked]).to(device)
        probs = torch.zeros(B, K, vocab_size, device=device)
        Kc = min(K, K_d)
        keep = (inside[:, :Kc] & learned_rows[:, None]).float()[..., None]
        probs[:, :Kc] = drafter.probs[:, :Kc].float() * keep
        one_hot = (inside & suffix_rows[:, None]).float()[..., None]
        probs.scatter_add_(-1, tokens[..., None], one_hot)
    return CombinedDraft(tokens, lens, probs, picked, drafts)
