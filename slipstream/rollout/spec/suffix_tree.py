"""Model-free drafting from token histories: suffix trees over recent rollouts and live outputs.

GRPO samples every prompt (group) n times per RL step and the same prompts come back in later
steps, so a sequence's next tokens are well predicted by earlier rollouts of its prompt, by the
live outputs of its sibling samples and by its own text. `SuffixTree` indexes token sequences and
proposes the most frequent continuation of a context; `SuffixDrafter` keeps the trees of a run
(per prompt over a sliding window of RL steps, per group over the current step, per request) and
picks the best proposal among them, in the manner of distribution-aware speculative decoding
(DASD, arXiv 2511.13841).

The index
---------
`SuffixTree` is a path-compressed suffix tree truncated at ``max_depth``: for every sequence and
every start position j it holds the string ``tokens[j : j + max_depth]`` (shorter at the end of
the sequence). A node stands for the path from the root to it; its ``count`` is the number of
stored strings that pass through or end at it, i.e. the path's frequency (how often it occurs
with room for it in the window of max_depth tokens), and ``ends`` the number of strings that end
exactly there (at the end of a sequence, at the live tail of a growing one, or at max_depth).
So ``count - ends`` is the number of occurrences with a known next token, and the probability of
a continuation is ``child.count / (node.count - node.ends)``. Following the most frequent child k
times multiplies out to the frequency of the k-token continuation over that of the matched suffix.

Edges are labelled by a reference into one stored sequence (``seq``, ``start``: an occurrence of
the node's whole path), so the tree has O(stored tokens) nodes. Every string ends at a node and
every other non-root node branches, which makes the shape a function of the stored strings
alone: rebuilding from the same sequences gives the same counts and the same proposals.

Costs, for D = max_depth:

* extending a live sequence by one token moves the endpoints of its (at most D) still-growing
  strings one step down, O(1) each: O(D) per token (10-25 us in CPython for D = 64);
* adding a finished sequence inserts each of its strings from the root (label comparisons are
  list-slice compares); removing the oldest sequence walks the same paths back;
* matching finds the longest suffix of the context that occurs with a continuation by a binary
  search over its length, each probe a walk of that length: O(D log D) token comparisons;
* a proposal of k tokens is k steps down the tree after the match; a path that reaches
  max_depth goes on from a shorter suffix of context + draft (one more walk).

Sequences are removed oldest first only (`pop_oldest`): each node keeps a reference to the
newest string that went through it, so with first-in-first-out removal a node's label never
points into a sequence that has left the tree while the node lives. (Where live sequences grow
interleaved, a label may still point into a removed sequence: it stays correct, as token lists
are only ever appended to, and merely keeps that list alive.)

Memory is roughly 250-400 bytes per stored token (nodes, their child dicts and the token lists),
which is what `SuffixConfig.max_tokens_per_prompt` and `max_prompts` bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SuffixConfig", "SuffixDraft", "SuffixDrafter", "SuffixNode", "SuffixTree"]


def _int_list(tokens: Iterable[int]) -> list[int]:
    """A fresh list of Python ints from a list, tuple, range or 1-D tensor."""
    if hasattr(tokens, "tolist"):
        out = tokens.tolist()
        return out if isinstance(out, list) else [out]
    return [int(t) for t in tokens]


def _tail(context: Any, n: int) -> list[int]:
    """The last n tokens of `context` as a list of ints."""
    if n <= 0:
        return []
    try:
        part = context[-n:]
    except TypeError:  # not sliceable (a deque, an iterator)
        part = list(context)[-n:]
    return _int_list(part)


class SuffixNode:
    """A node of `SuffixTree`: the path from the root to it, ``depth`` tokens long.

    ``count``: strings passing through or ending here (the path's frequency); ``ends``: strings
    ending here; ``children``: first token of the child's edge -> child (None for a leaf). The
    path is ``seq[start : start + depth]``.
    """

    __slots__ = ("parent", "children", "count", "ends", "depth", "seq", "start")

    def __init__(self, parent: SuffixNode | None, depth: int, count: int, ends: int,
                 seq: list[int] | None, start: int):
        self.parent = parent
        self.children: dict[int, SuffixNode] | None = None
        self.count = count
        self.ends = ends
        self.depth = depth
        self.seq = seq
        self.start = start

    def __repr__(self) -> str:
        path = [] if self.seq is None else self.seq[self.start:self.start + self.depth]
        return f"SuffixNode(depth={self.depth}, count={self.count}, ends={self.ends}, path={path})"


class _Seq:
    __slots__ = ("tokens", "active", "finished")

    def __init__(self, tokens: list[int], finished: bool):
        self.tokens = tokens
        self.active: list[SuffixNode] = []  # endpoints of the strings that can still grow
        self.finished = finished


class SuffixTree:
    """A suffix tree over token sequences truncated at `max_depth` (see the module docstring).

    ``add(tokens)`` stores a finished sequence, ``extend(key, tokens)`` grows a live one (created
    on first use), ``pop_oldest()`` removes the oldest sequence. ``match(context)`` finds the
    longest suffix of the context that occurs with a continuation, ``propose(context, ...)`` the
    most frequent continuation from there.
    """

    def __init__(self, max_depth: int = 64):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = int(max_depth)
        self.clear()

    def clear(self) -> None:
        self.root = SuffixNode(None, 0, 0, 0, None, 0)
        self._seqs: OrderedDict[Hashable, _Seq] = OrderedDict()
        self._next_key = 0
        self.num_tokens = 0  # tokens of the stored sequences
        self.num_nodes = 1

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seqs

    def sequences(self) -> list[list[int]]:
        """The stored sequences, oldest first (the tree's own lists: do not modify them)."""
        return [s.tokens for s in self._seqs.values()]

    def _new_key(self) -> int:
        while self._next_key in self._seqs:
            self._next_key += 1
        key = self._next_key
        self._next_key += 1
        return key

    # ---------------------------------------------------------------- insertion

    def add(self, tokens: Iterable[int], key: Hashable | None = None) -> Hashable:
        """Store a finished sequence; returns its key (a fresh int unless given)."""
        if key is None:
            key = self._new_key()
        elif key in self._seqs:
            raise KeyError(f"sequence {key!r} is already stored")
        seq = _int_list(tokens)
        s = _Seq(seq, finished=True)
        self._seqs[key] = s
        n, depth = len(seq), self.max_depth
        for j in range(n):
            self._insert(seq, j, min(depth, n - j))
        self.num_tokens += n
        return key

    def extend(self, key: Hashable, new_tokens: Iterable[int]) -> None:
        """Append tokens to the live sequence `key`, creating it if it is new."""
        toks = _int_list(new_tokens)
        s = self._seqs.get(key)
        if s is None:
            seq = toks
            s = _Seq(seq, finished=False)
            self._seqs[key] = s
            n, depth = len(seq), self.max_depth
            for j in range(n):
                end = self._insert(seq, j, min(depth, n - j))
                if n - j < depth:
                    s.active.append(end)
            self.num_tokens += n
            return
        if s.finished:
            raise ValueError(f"sequence {key!r} is finished")
        for t in toks:
            self._append(s, t)

    def finish(self, key: Hashable) -> None:
        """Mark a live sequence finished (it stays indexed; it can no longer grow)."""
        s = self._seqs[key]
        s.finished = True
        s.active = []

    def _insert(self, seq: list[int], j: int, length: int) -> SuffixNode:
        """Insert the string seq[j : j + length] from the root; returns the node it ends at."""
        node = self.root
        node.count += 1
        d = 0
        while d < length:
            t = seq[j + d]
            ch = node.children
            c = None if ch is None else ch.get(t)
            if c is None:
                leaf = SuffixNode(node, length, 1, 1, seq, j)
                if ch is None:
                    node.children = {t: leaf}
                else:
                    ch[t] = leaf
                self.num_nodes += 1
                return leaf
            cd = c.depth
            k = cd if cd < length else length
            m = d + 1
            if k > m:
                cs, c0 = c.seq, c.start
                if cs[c0 + m:c0 + k] == seq[j + m:j + k]:
                    m = k
                else:
                    while cs[c0 + m] == seq[j + m]:
                        m += 1
            if m < cd:  # the string leaves c's edge (or ends on it): split the edge at depth m
                mid = SuffixNode(node, m, c.count, 0, seq, j)
                mid.children = {c.seq[c.start + m]: c}
                c.parent = mid
                ch[t] = mid
                self.num_nodes += 1
                c = mid
            c.count += 1
            c.seq = seq
            c.start = j
            node = c
            d = m
        node.ends += 1
        return node

    def _append(self, s: _Seq, t: int) -> None:
        seq = s.tokens
        n = len(seq)
        seq.append(t)
        depth = self.max_depth
        step = self._step
        active = []
        for e in s.active:  # the string starting at n - e.depth grows by one token
            w = step(e, t, seq, n - e.depth)
            if w.depth < depth:
                active.append(w)
        root = self.root
        root.count += 1
        root.ends += 1
        active.append(step(root, t, seq, n))  # depth 1 < max_depth
        s.active = active
        self.num_tokens += 1

    def _step(self, e: SuffixNode, t: int, seq: list[int], j: int) -> SuffixNode:
        """Move the end of the string seq[j:...] from node `e` one token (`t`) down."""
        d = e.depth
        ch = e.children
        if ch is None:
            if e.count == 1 and e is not self.root:  # a leaf of this string alone: grow its edge
                e.depth = d + 1
                e.seq = seq
                e.start = j
                return e
            leaf = SuffixNode(e, d + 1, 1, 1, seq, j)
            e.children = {t: leaf}
            e.ends -= 1
            self.num_nodes += 1
            return leaf
        c = ch.get(t)
        if c is None:
            c = SuffixNode(e, d + 1, 1, 1, seq, j)
            ch[t] = c
            e.ends -= 1
            self.num_nodes += 1
            return c
        if c.depth == d + 1:
            c.count += 1
            c.ends += 1
            c.seq = seq
            c.start = j
        else:
            m = SuffixNode(e, d + 1, c.count + 1, 1, seq, j)
            m.children = {c.seq[c.start + d + 1]: c}
            c.parent = m
            ch[t] = m
            self.num_nodes += 1
            c = m
        e.ends -= 1
        if e.ends == 0 and len(ch) == 1 and e is not self.root:
            self._splice(e, c)
        return c

    def _splice(self, e: SuffixNode, c: SuffixNode) -> None:
        """Remove `e`, which no string ends at and which has the single child `c`."""
        p = e.parent
        p.children[e.seq[e.start + p.depth]] = c
        c.parent = p
        self.num_nodes -= 1

    # ---------------------------------------------------------------- removal

    def pop_oldest(self) -> Hashable:
        """Remove the oldest stored sequence; returns its key."""
        key, s = self._seqs.popitem(last=False)
        seq = s.tokens
        n, depth = len(seq), self.max_depth
        for j in range(n):
            self._remove(seq, j, min(depth, n - j))
        self.num_tokens -= n
        return key

    def _remove(self, seq: list[int], j: int, length: int) -> None:
        node = self.root
        node.count -= 1
        path = []
        d = 0
        while d < length:
            node = node.children[seq[j + d]]
            node.count -= 1
            path.append(node)
            d = node.depth
        node.ends -= 1
        for v in reversed(path):
            if v.count == 0:
                p = v.parent
                del p.children[v.seq[v.start + p.depth]]
                if not p.children:
                    p.children = None
                self.num_nodes -= 1
            elif v.ends == 0 and len(v.children) == 1:
                self._splice(v, next(iter(v.children.values())))

    # ---------------------------------------------------------------- queries

    def _locate(self, ctx: list[int], s: int, length: int) -> tuple[SuffixNode, int] | None:
        """Walk ctx[s : s + length] from the root: (node at or below the end, length) or None."""
        node = self.root
        d = 0
        while d < length:
            ch = node.children
            if ch is None:
                return None
            c = ch.get(ctx[s + d])
            if c is None:
                return None
            k = c.depth if c.depth < length else length
            if k - d > 1 and c.seq[c.start + d + 1:c.start + k] != ctx[s + d + 1:s + k]:
                return None
            node = c
            d = k
        return node, length

    def _match(self, ctx: list[int], limit: int | None = None) -> tuple[SuffixNode, int]:
        n = len(ctx)
        hi = min(n, self.max_depth - 1)
        if limit is not None:
            hi = min(hi, limit)
        best = (self.root, 0)
        lo = 0
        while lo < hi:  # having a continuation is monotone in the suffix length: bisect it
            mid = (lo + hi + 1) >> 1
            pos = self._locate(ctx, n - mid, mid)
            if pos is not None and (pos[0].depth > mid or pos[0].count > pos[0].ends):
                best, lo = pos, mid
            else:
                hi = mid - 1
        return best

    def match(self, context: Any, max_match: int | None = None) -> tuple[SuffixNode, int]:
        """Longest suffix of `context` (at most max_depth - 1 tokens, and `max_match`) that occurs
        in the index followed by at least one token: (node, match_len).

        The node is the one the matched path reaches or whose edge it ends on (``node.depth >=
        match_len``). A suffix seen only at the end of a sequence, or only as the live tail of the
        context itself, has nothing to propose and does not count as a match. (root, 0) when no
        suffix matches.
        """
        return self._match(_tail(context, self.max_depth), max_match)

    def _draft(self, ctx: list[int], node: SuffixNode, length: int, max_len: int,
               min_token_prob: float) -> tuple[list[int], list[float]]:
        depth = self.max_depth
        tokens: list[int] = []
        probs: list[float] = []
        cum = 1.0
        d = length
        while len(tokens) < max_len:
            if d == depth:
                # Paths stop at max_depth: go on from the suffix of context + draft that leaves
                # room for the rest of the draft (it occurs: it is part of the path just walked).
                full = ctx + tokens
                shorter = max(1, depth - (max_len - len(tokens)))
                node, d = self._locate(full, len(full) - shorter, shorter)
            if d < node.depth:  # inside an edge: one continuation
                t = node.seq[node.start + d]
                p = 1.0
                nxt = node
            else:
                ch = node.children
                total = node.count - node.ends
                if ch is None or total <= 0:
                    break
                t, nxt, best = -1, None, 0
                for tok, c in ch.items():  # most frequent child, ties to the smaller token id
                    cc = c.count
                    if cc > best or (cc == best and tok < t):
                        t, nxt, best = tok, c, cc
                p = best / total
            cum *= p
            if cum < min_token_prob:
                break
            tokens.append(t)
            probs.append(p)
            node = nxt
            d += 1
        return tokens, probs

    def propose(self, context: Any, max_len: int, min_token_prob: float = 0.0
                ) -> tuple[list[int], list[float]]:
        """Greedy most-frequent continuation of `context`: (draft_tokens, probs).

        probs[i] is the conditional probability of draft_tokens[i] (child count over the number
        of continuations at its parent); the chain stops at max_len tokens, where no occurrence
        continues, or before the cumulative probability (their product) falls below
        `min_token_prob`.
        """
        if max_len <= 0:
            return [], []
        ctx = _tail(context, self.max_depth)
        node, length = self._match(ctx)
        return self._draft(ctx, node, length, max_len, min_token_prob)

    def count(self, path: Iterable[int]) -> int:
        """How many stored strings start with `path` (0 if longer than max_depth)."""
        p = _int_list(path)
        if len(p) > self.max_depth:
            return 0
        pos = self._locate(p, 0, len(p))
        return 0 if pos is None else pos[0].count

    def continuations(self, path: Iterable[int]) -> dict[int, int]:
        """Next token -> number of occurrences of `path` followed by it."""
        p = _int_list(path)
        pos = self._locate(p, 0, len(p)) if len(p) < self.max_depth else None
        if pos is None:
            return {}
        node, d = pos
        if d < node.depth:
            return {node.seq[node.start + d]: node.count}
        return {t: c.count for t, c in (node.children or {}).items()}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and dicts: the sequences, oldest first, and whether each is finished."""
        return {"max_depth": self.max_depth,
                "sequences": [[k, list(s.tokens), s.finished] for k, s in self._seqs.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_depth = int(state["max_depth"])
        self.clear()
        for key, tokens, finished in state["sequences"]:
            key = tuple(key) if isinstance(key, list) else key
            if finished:
                self.add(tokens, key=key)
            else:
                self.extend(key, tokens)

    def _validate(self) -> None:
        """Check the structural invariants (for tests)."""
        nodes = 0
        stack = [self.root]
        while stack:
            v = stack.pop()
            nodes += 1
            below = 0
            for t, c in (v.children or {}).items():
                assert c.parent is v, "parent link"
                assert c.depth > v.depth, "depth order"
                assert c.seq[c.start + v.depth] == t, "edge key"
                assert c.count > 0, "empty node"
                below += c.count
                stack.append(c)
            assert v.count == v.ends + below, "count = ends + children"
            if v is not self.root:
                assert v.ends > 0 or len(v.children or ()) >= 2, "unary node without an end"
                p = v.parent
                assert v.seq[v.start:v.start + p.depth] == (
                    [] if p is self.root else p.seq[p.start:p.start + p.depth]), "label"
        assert nodes == self.num_nodes, "node count"
        assert self.num_tokens == sum(len(s.tokens) for s in self._seqs.values()), "token count"


# ==================================================================== drafter


@dataclass
class SuffixConfig:
    """Parameters of `SuffixDrafter`.

    window_steps: RL steps of a prompt's finished rollouts kept (W). max_depth: longest suffix
    indexed and matched in the windows. live_max_depth: the same for the trees of the current
    step's live outputs (own and siblings), which grow token by token on the decode path, where
    each token updates every indexed suffix that ends at it (a draft's length is capped at `cap`
    anyway, so longer matches only sharpen the counts). cap: longest draft. alpha: a draft is at
    most alpha * match length.
    min_token_prob: a draft stops before its cumulative probability falls below this.
    max_tokens_per_prompt: tokens stored per prompt (oldest rollouts go first; also bounds the
    per-step group index). max_prompts: prompts with a history (least recently used go first).
    """

    window_steps: int = 4
    max_depth: int = 64
    live_max_depth: int = 24
    cap: int = 16
    alpha: float = 1.0
    min_token_prob: float = 0.1
    max_tokens_per_prompt: int = 32768
    max_prompts: int = 256

    def __post_init__(self):
        if self.window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {self.window_steps}")
        if self.max_depth < 2 or self.live_max_depth < 2:
            raise ValueError(f"max_depth and live_max_depth must be >= 2, got {self.max_depth}, "
                             f"{self.live_max_depth}")
        if self.cap < 0 or self.alpha < 0:
            raise ValueError(f"cap and alpha must be >= 0, got {self.cap}, {self.alpha}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")
        if self.max_tokens_per_prompt < 1 or self.max_prompts < 1:
            raise ValueError("max_tokens_per_prompt and max_prompts must be >= 1")


@dataclass
class SuffixDraft:
    """A proposal: tokens, the conditional probability of each, where it came from ("own",
    "siblings", "window" or None), the match length and the score (expected accepted tokens
    under the counts: the sum of the cumulative probabilities)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    source: str | None = None
    match_len: int = 0
    score: float = 0.0

    def __len__(self) -> int:
        return len(self.tokens)


class _History:
    """A prompt's finished rollouts over the window: their index (oldest first), the step of
    each indexed rollout, and (step, length) of every rollout in the window."""

    __slots__ = ("tree", "steps", "lengths")

    def __init__(self, max_depth: int):
        self.tree = SuffixTree(max_depth)
        self.steps: deque[int] = deque()
        self.lengths: deque[tuple[int, int]] = deque()


class _Request:
    __slots__ = ("group_id", "tree", "output")

    def __init__(self, group_id: Hashable, tree: SuffixTree):
        self.group_id = group_id
        self.tree = tree
        self.output: list[int] = []


class _Group:
    """The current step's index of one prompt: the prompt once and every member's output."""

    __slots__ = ("tree", "frozen")

    def __init__(self, max_depth: int):
        self.tree = SuffixTree(max_depth)
        self.frozen = False


_PROMPT = ("prompt",)
_OWN = 0


def _hashable(x: Any) -> Hashable:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


class SuffixDrafter:
    """Suffix-tree drafts for GRPO rollouts from three sources:

    * ``window``: per prompt (group_id), the finished rollouts of the last `window_steps` RL
      steps (a rollout of step s is used in steps s+1 .. s+W);
    * ``siblings``: per group, the prompt and the live outputs of all its requests in the current
      step (a request's own output included);
    * ``own``: per request, the last max_depth prompt tokens followed by its output (the whole
      prompt is indexed once per group, in ``siblings``, so registering a request stays cheap).

    A prompt's window keeps at most max_tokens_per_prompt tokens (oldest rollouts go first; a
    longer rollout keeps its first tokens) and at most max_prompts prompts have a window (the
    least recently used goes first; registering a request or recording a rollout uses it).

    Each source matches the context's longest suffix and walks its most frequent continuation;
    a source's draft is at most min(cap, max_len, floor(alpha * match_len)) tokens and stops
    before its cumulative probability drops below min_token_prob. The draft with the highest
    score (the sum of its cumulative probabilities: expected accepted tokens) wins; ties go to
    the longer match, then to own, siblings, window in that order.

    Lifecycle per RL step: `add_request` for each sample, `update` with its new tokens,
    `finish_request` when done; `end_step()` moves the finished outputs into their prompts'
    windows, drops the per-step state (requests still running are dropped too) and advances the
    step, evicting rollouts older than the window. `start_step(step)` sets the step explicitly
    (ending a step in progress first). `add_rollout` records a finished rollout directly.
    """

    SOURCES = ("own", "siblings", "window")

    def __init__(self, config: SuffixConfig | None = None):
        self.config = config if config is not None else SuffixConfig()
        self.step = 0
        self._prompts: OrderedDict[Hashable, _History] = OrderedDict()  # LRU: oldest first
        self._groups: dict[Hashable, _Group] = {}
        self._requests: dict[Hashable, _Request] = {}
        self._pending: dict[Hashable, list[list[int]]] = {}  # finished this step, not committed

    # ---------------------------------------------------------------- step lifecycle

    def start_step(self, step: int | None = None) -> None:
        """Begin an RL step (the next one, or `step`); ends the current one if it has state."""
        if self._groups or self._requests or self._pending:
            self.end_step()
        if step is not None:
            self.step = int(step)
        self._evict_window()

    def discard_step(self) -> None:
        """Forget this step's live state and finished outputs, record nothing and stay at this
        step (for rollouts that must not shape later drafts, e.g. evaluations)."""
        self._pending.clear()
        self._groups.clear()
        self._requests.clear()

    def end_step(self) -> None:
        """Commit this step's finished outputs to their prompts' windows and advance the step."""
        for gid, outputs in self._pending.items():
            for out in outputs:
                self._commit(gid, out, self.step)
        self._pending.clear()
        self._groups.clear()
        self._requests.clear()
        self.step += 1
        self._evict_window()

    def _evict_window(self) -> None:
        oldest = self.step - self.config.window_steps
        for gid in list(self._prompts):
            h = self._prompts[gid]
            while h.steps and h.steps[0] < oldest:
                h.tree.pop_oldest()
                h.steps.popleft()
            while h.lengths and h.lengths[0][0] < oldest:
                h.lengths.popleft()
            if not h.steps and not h.lengths:
                del self._prompts[gid]

    def _commit(self, group_id: Hashable, tokens: list[int], step: int) -> None:
        cfg = self.config
        h = self._prompts.get(group_id)
        if h is None:
            h = self._prompts[group_id] = _History(cfg.max_depth)
            while len(self._prompts) > cfg.max_prompts:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(group_id)
            if h.steps and step < h.steps[-1]:
                raise ValueError(f"rollouts must be recorded in step order: {step} after "
                                 f"{h.steps[-1]}")
        h.lengths.append((step, len(tokens)))
        h.tree.add(tokens[:cfg.max_tokens_per_prompt])
        h.steps.append(step)
        while h.tree.num_tokens > cfg.max_tokens_per_prompt:
            h.tree.pop_oldest()
            h.steps.popleft()

    def add_rollout(self, group_id: Hashable, tokens: Iterable[int],
                    step: int | None = None) -> None:
        """Record a finished rollout of `group_id` (output tokens) in its window right away, as
        of `step` (default: the current step). Steps must not decrease per prompt."""
        self._commit(group_id, _int_list(tokens), self.step if step is None else int(step))

    # ---------------------------------------------------------------- requests

    def add_request(self, request_key: Hashable, group_id: Hashable,
                    prompt_tokens: Iterable[int], output_tokens: Iterable[int] = ()) -> None:
        """Register a live sample of `group_id` in the current step, with the tokens it has
        generated so far (indexed in one pass, several times cheaper per token than `update`)."""
        if request_key in self._requests:
            raise KeyError(f"request {request_key!r} is already registered")
        cfg = self.config
        prompt = _int_list(prompt_tokens)
        output = _int_list(output_tokens)
        own = SuffixTree(cfg.live_max_depth)
        own.extend(_OWN, prompt[-cfg.live_max_depth:] + output)
        req = self._requests[request_key] = _Request(group_id, own)
        group = self._groups.get(group_id)
        if group is None:
            group = self._groups[group_id] = _Group(cfg.live_max_depth)
            group.tree.add(prompt[:cfg.max_tokens_per_prompt], key=_PROMPT)
        if group_id in self._prompts:
            self._prompts.move_to_end(group_id)
        req.output = output
        if output:
            self._extend_group(group_id, request_key, output)

    def update(self, request_key: Hashable, new_tokens: Iterable[int]) -> None:
        """Append newly generated tokens of a live request."""
        req = self._requests[request_key]
        toks = _int_list(new_tokens)
        if not toks:
            return
        req.output.extend(toks)
        req.tree.extend(_OWN, toks)
        self._extend_group(req.group_id, request_key, toks)

    def _extend_group(self, group_id: Hashable, request_key: Hashable, toks: list[int]) -> None:
        """Append a request's new tokens to its group's index, within the index's room."""
        group = self._groups[group_id]
        if group.frozen:
            return
        room = self.config.max_tokens_per_prompt - group.tree.num_tokens
        if room < len(toks):
            toks = toks[:max(room, 0)]
            group.frozen = True  # the group index is full for this step
        if toks:
            group.tree.extend(("out", request_key), toks)

    def finish_request(self, request_key: Hashable, output_tokens: Iterable[int] | None = None
                       ) -> None:
        """A request is done: its output (the tokens given to `update`, or `output_tokens`)
        joins its prompt's window at `end_step`; it stays in the group index for this step."""
        req = self._requests.pop(request_key)
        out = req.output if output_tokens is None else _int_list(output_tokens)
        self._pending.setdefault(req.group_id, []).append(out)

    def abort_request(self, request_key: Hashable) -> None:
        """Forget a live request without recording its output."""
        self._requests.pop(request_key, None)

    # ---------------------------------------------------------------- drafting

    def propose(self, request_key: Hashable | None, group_id: Hashable, context_tokens: Any,
                max_len: int | None = None) -> SuffixDraft:
        """Draft a continuation of `context_tokens` (the request's prompt + output so far)."""
        cfg = self.config
        limit = cfg.cap if max_len is None else min(cfg.cap, int(max_len))
        if limit <= 0:
            return SuffixDraft()
        sources: list[tuple[str, SuffixTree]] = []
        req = self._requests.get(request_key) if request_key is not None else None
        if req is not None:
            sources.append(("own", req.tree))
        group = self._groups.get(group_id)
        if group is not None:
            sources.append(("siblings", group.tree))
        h = self._prompts.get(group_id)
        if h is not None and h.tree.num_tokens:
            sources.append(("window", h.tree))
        if not sources:
            return SuffixDraft()
        ctx = _tail(context_tokens, cfg.max_depth)
        best = SuffixDraft()
        for name, tree in sources:
            node, length = tree._match(ctx)
            k = min(limit, math.floor(cfg.alpha * length + 1e-9))
            if k <= 0:
                continue
            tokens, probs = tree._draft(ctx, node, length, k, cfg.min_token_prob)
            if not tokens:
                continue
            score, cum = 0.0, 1.0
            for p in probs:
                cum *= p
                score += cum
            if (score, length) > (best.score, best.match_len):
                best = SuffixDraft(tokens, probs, name, length, score)
        return best

    # ---------------------------------------------------------------- history queries

    def expected_length(self, group_id: Hashable) -> float | None:
        """Mean output length of the prompt's rollouts in the window; None without any."""
        h = self._prompts.get(group_id)
        if h is None or not h.lengths:
            return None
        return sum(n for _, n in h.lengths) / len(h.lengths)

    def live_tokens(self, group_id: Hashable) -> int:
        """Tokens in the group's index for the current step (its prompt and outputs)."""
        group = self._groups.get(group_id)
        return 0 if group is None else group.tree.num_tokens

    @property
    def num_prompts(self) -> int:
        return len(self._prompts)

    def prompts(self) -> list[Hashable]:
        """Prompts with a history, least recently used first."""
        return list(self._prompts)

    def stored_tokens(self, group_id: Hashable | None = None) -> int:
        """Tokens indexed in the windows (of one prompt, or of all)."""
        if group_id is not None:
            h = self._prompts.get(group_id)
            return 0 if h is None else h.tree.num_tokens
        return sum(h.tree.num_tokens for h in self._prompts.values())

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The step, every prompt's window (LRU order) and this step's finished outputs, as plain
        lists and dicts (JSON-serialisable when group ids are). Live requests are not saved."""
        prompts = []
        for gid, h in self._prompts.items():
            prompts.append({"group_id": gid,
                            "rollouts": [[s, list(t)]
                                         for s, t in zip(h.steps, h.tree.sequences())],
                            "lengths": [[s, n] for s, n in h.lengths]})
        return {"version": 1, "step": self.step, "prompts": prompts,
                "pending": [[gid, [list(o) for o in outs]] for gid, outs in self._pending.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` (the current config's caps and window apply)."""
        cfg = self.config
        self.step = int(state["step"])
        self._prompts.clear()
        self._groups.clear()
        self._requests.clear()
        self._pending.clear()
        for entry in state["prompts"]:
            gid = _hashable(entry["group_id"])
            h = self._prompts[gid] = _History(cfg.max_depth)
            for s, toks in entry["rollouts"]:
                h.tree.add(toks[:cfg.max_tokens_per_prompt])
                h.steps.append(int(s))
            while h.tree.num_tokens > cfg.max_tokens_per_prompt:
                h.tree.pop_oldest()
                h.steps.popleft()
            h.lengths.extend((int(s), int(n)) for s, n in entry["lengths"])
        while len(self._prompts) > cfg.max_prompts:
            self._prompts.popitem(last=False)
        for gid, outs in state.get("pending", []):
            self._pending[_hashable(gid)] = [_int_list(o) for o in outs]
        self._evict_window()
