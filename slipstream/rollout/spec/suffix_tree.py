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

Edges are labelled by a reference into one stored sequence (a sequence id and ``start``: an
occurrence of the node's whole path), so the tree has O(stored tokens) nodes. Every string ends at
a node and every other non-root node branches, which makes the shape a function of the stored
strings alone: rebuilding from the same sequences gives the same counts and the same proposals.

Nodes are not objects: a node is an int id into flat per-field lists of ints (parent, count, ends,
depth, label sequence id and start), its children a dict first token -> child id, and a growing
sequence's endpoints are ids too. CPython does not track dicts that hold only ints, so the garbage
collector sees a few containers per tree and one list per sequence instead of about one node and
child dict per token (1.1-1.3 tracked objects per token before, which a full collection walks).
Removed nodes' ids are reused.

Costs, for D = max_depth:

* extending a live sequence by one token moves the endpoints of its (at most D) still-growing
  strings one step down, O(1) each: O(D) per token (10-25 us in CPython for D = 64);
* adding a finished sequence inserts each of its strings from the root (label comparisons are
  list-slice compares); removing the oldest sequence walks the same paths back;
* matching finds the longest suffix of the context that occurs with a continuation by a binary
  search over its length, each probe a walk of that length: O(D log D) token comparisons;
* a proposal of k tokens is k steps down the tree after the match; a path that reaches
  max_depth goes on from a shorter suffix of context + draft (one more walk).

Sequences are removed oldest first only (`pop_oldest`): each node's label is the newest string
that went through it, so with first-in-first-out removal a node's label never points into a
sequence that has left the tree while the node lives. (Where a live sequence grows after a newer
one was stored, a label may still point into it once it is removed: its tokens stay correct, as
token lists are only ever appended to, and the tree keeps them until a scan of the labels, run
once such kept tokens outgrow the stored ones, finds no label pointing there.)

Memory is roughly 250-400 bytes per stored token (the entries of the per-field lists and the ints
they hold, the child dicts and the token lists; 1.2-1.8 nodes per token), which is what
`SuffixConfig.max_tokens_per_prompt` and `max_prompts` bound.
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
    """A read-only view of one node of a `SuffixTree` (``match`` and ``root`` make one on demand;
    it stays valid until the tree changes).

    ``id``: the node's index in the tree's storage; ``count``: strings passing through or ending
    here (the path's frequency); ``ends``: strings ending here; ``children``: first token of the
    child's edge -> child (None for a leaf). The path is ``seq[start : start + depth]``.
    """

    __slots__ = ("_tree", "id")

    def __init__(self, tree: SuffixTree, node_id: int):
        self._tree = tree
        self.id = node_id

    @property
    def parent(self) -> SuffixNode | None:
        p = self._tree._par[self.id]
        return None if p < 0 else SuffixNode(self._tree, p)

    @property
    def children(self) -> dict[int, SuffixNode] | None:
        ch = self._tree._kid[self.id]
        return None if ch is None else {t: SuffixNode(self._tree, c) for t, c in ch.items()}

    @property
    def count(self) -> int:
        return self._tree._cnt[self.id]

    @property
    def ends(self) -> int:
        return self._tree._end[self.id]

    @property
    def depth(self) -> int:
        return self._tree._dep[self.id]

    @property
    def seq(self) -> list[int] | None:
        return self._tree._tok.get(self._tree._sid[self.id])

    @property
    def start(self) -> int:
        return self._tree._st[self.id]

    @property
    def path(self) -> list[int]:
        seq = self.seq
        return [] if seq is None else seq[self.start:self.start + self.depth]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SuffixNode) and other._tree is self._tree and other.id == self.id

    def __hash__(self) -> int:
        return hash((id(self._tree), self.id))

    def __repr__(self) -> str:
        return (f"SuffixNode(id={self.id}, depth={self.depth}, count={self.count}, "
                f"ends={self.ends}, path={self.path})")


class SuffixTree:
    """A suffix tree over token sequences truncated at `max_depth` (see the module docstring).

    ``add(tokens)`` stores a finished sequence, ``extend(key, tokens)`` grows a live one (created
    on first use), ``pop_oldest()`` removes the oldest sequence. ``match(context)`` finds the
    longest suffix of the context that occurs with a continuation, ``propose(context, ...)`` the
    most frequent continuation from there.

    Node v (0 is the root) is the v-th entry of the per-field lists ``_par`` (parent, -1 for the
    root), ``_cnt`` (count), ``_end`` (ends), ``_dep`` (depth), ``_sid`` and ``_st`` (the label:
    sequence id, -1 for the root and free ids, and start) and ``_kid`` (None or a dict first token
    -> child id). Removed nodes' ids go back to ``_free``, which new nodes take from; the storage
    grows by blocks of free ids.
    """

    def __init__(self, max_depth: int = 64):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = int(max_depth)
        self.clear()

    def clear(self) -> None:
        self._par: list[int] = [-1]
        self._cnt: list[int] = [0]
        self._end: list[int] = [0]
        self._dep: list[int] = [0]
        self._sid: list[int] = [-1]
        self._st: list[int] = [0]
        self._kid: list[dict[int, int] | None] = [None]
        self._free: list[int] = []
        self._seqs: OrderedDict[Hashable, int] = OrderedDict()  # key -> sequence id, oldest first
        self._tok: dict[int, list[int]] = {}  # sequence id -> its tokens (labels point into them)
        self._live: dict[int, list[int]] = {}  # growing sequence -> its growing strings' ends
        self._grew: set[int] = set()  # live sequences that grew after a newer one was stored
        self._kept: set[int] = set()  # removed sequences whose tokens labels may still point into
        self._kept_tokens = 0
        self._kept_check = 4096
        self._next_sid = 0
        self._next_key = 0
        self.num_tokens = 0  # tokens of the stored sequences
        self.num_nodes = 1

    @property
    def root(self) -> SuffixNode:
        return SuffixNode(self, 0)

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seqs

    def sequences(self) -> list[list[int]]:
        """The stored sequences, oldest first (the tree's own lists: do not modify them)."""
        tok = self._tok
        return [tok[sid] for sid in self._seqs.values()]

    def _new_key(self) -> int:
        while self._next_key in self._seqs:
            self._next_key += 1
        key = self._next_key
        self._next_key += 1
        return key

    def _register(self, key: Hashable, seq: list[int]) -> int:
        sid = self._next_sid
        self._next_sid = sid + 1
        self._seqs[key] = sid
        self._tok[sid] = seq
        return sid

    def _reserve(self) -> None:
        """Grow the storage by a block of free ids (an eighth of it, at least 64). A new node takes
        a free id and sets its fields; a free id has no parent, children or label."""
        lo = len(self._par)
        k = max(64, lo >> 3)
        for f, x in ((self._par, -1), (self._cnt, 0), (self._end, 0), (self._dep, 0),
                     (self._sid, -1), (self._st, 0), (self._kid, None)):
            f.extend([x] * k)
        self._free.extend(range(lo + k - 1, lo - 1, -1))  # handed out in increasing order

    def _release(self, v: int) -> None:
        self._par[v] = -1
        self._kid[v] = None
        self._sid[v] = -1
        self._free.append(v)
        self.num_nodes -= 1

    # ---------------------------------------------------------------- insertion

    def add(self, tokens: Iterable[int], key: Hashable | None = None) -> Hashable:
        """Store a finished sequence; returns its key (a fresh int unless given)."""
        if key is None:
            key = self._new_key()
        elif key in self._seqs:
            raise KeyError(f"sequence {key!r} is already stored")
        seq = _int_list(tokens)
        self._insert(seq, self._register(key, seq), None)
        return key

    def extend(self, key: Hashable, new_tokens: Iterable[int]) -> None:
        """Append tokens to the live sequence `key`, creating it if it is new."""
        toks = _int_list(new_tokens)
        sid = self._seqs.get(key)
        if sid is None:
            sid = self._register(key, toks)
            active: list[int] = []
            self._insert(toks, sid, active)
            self._live[sid] = active
            return
        active = self._live.get(sid)
        if active is None:
            raise ValueError(f"sequence {key!r} is finished")
        if toks:
            if sid != self._next_sid - 1:
                self._grew.add(sid)
            self._live[sid] = self._grow(sid, toks, active)

    def finish(self, key: Hashable) -> None:
        """Mark a live sequence finished (it stays indexed; it can no longer grow)."""
        self._live.pop(self._seqs[key], None)

    def _insert(self, seq: list[int], sid: int, active: list[int] | None) -> None:
        """Insert every string seq[j : j + max_depth] from the root; with `active`, append the
        nodes the strings shorter than max_depth end at (those that can grow)."""
        par, cnt, end, dep, sq, st, kid, tok = (self._par, self._cnt, self._end, self._dep,
                                                  self._sid, self._st, self._kid, self._tok)
        free, reserve = self._free, self._reserve
        n, depth = len(seq), self.max_depth
        made = 0
        for j in range(n):
            length = n - j
            if length > depth:
                length = depth
            v = 0
            d = 0
            while d < length:
                t = seq[j + d]
                ch = kid[v]
                c = None if ch is None else ch.get(t)
                if c is None:  # a new leaf ends the string
                    if not free:
                        reserve()
                    c = free.pop()
                    par[c], cnt[c], end[c], dep[c], sq[c], st[c] = v, 1, 1, length, sid, j
                    made += 1
                    if ch is None:
                        kid[v] = {t: c}
                    else:
                        ch[t] = c
                    v = c
                    break
                cd, c0, x = dep[c], st[c], sq[c]  # read together: their cache misses overlap
                k = cd if cd < length else length
                m = d + 1
                if k > m:
                    cs = tok[x]
                    if cs[c0 + m:c0 + k] == seq[j + m:j + k]:
                        m = k
                    else:
                        while cs[c0 + m] == seq[j + m]:
                            m += 1
                if m < cd:  # the string leaves c's edge (or ends on it): split the edge at depth m
                    if not free:
                        reserve()
                    mid = free.pop()
                    par[mid], cnt[mid], end[mid], dep[mid] = v, cnt[c], 0, m
                    sq[mid], st[mid] = sid, j
                    kid[mid] = {tok[x][c0 + m]: c}
                    made += 1
                    par[c] = mid
                    ch[t] = mid
                    c = mid
                cnt[c] += 1
                sq[c] = sid
                st[c] = j
                v = c
                d = m
            else:
                end[v] += 1
            if active is not None and n - j < depth:
                active.append(v)
        cnt[0] += n
        self.num_nodes += made
        self.num_tokens += n

    def _grow(self, sid: int, toks: list[int], active: list[int]) -> list[int]:
        """Append `toks` to the live sequence `sid`: each token moves the endpoints of its growing
        strings (and of a new one at the root) one step down. Returns the new endpoints."""
        par, cnt, end, dep, sq, st, kid, tok = (self._par, self._cnt, self._end, self._dep,
                                                  self._sid, self._st, self._kid, self._tok)
        free, reserve = self._free, self._reserve
        seq = tok[sid]
        last = self.max_depth - 1
        made = 0
        for t in toks:
            n = len(seq)
            seq.append(t)
            cnt[0] += 1
            end[0] += 1
            active.append(0)  # the string starting at the new token, at the root for now
            grown = []
            for e in active:  # the string starting at n - depth(e) grows by one token
                d = dep[e]
                j = n - d
                ch = kid[e]
                if ch is None:
                    if e and cnt[e] == 1:  # a leaf of this string alone: grow its edge
                        dep[e] = d + 1
                        sq[e] = sid
                        st[e] = j
                        if d < last:
                            grown.append(e)
                        continue
                    if not free:
                        reserve()
                    c = free.pop()
                    par[c], cnt[c], end[c], dep[c], sq[c], st[c] = e, 1, 1, d + 1, sid, j
                    made += 1
                    kid[e] = {t: c}
                    end[e] -= 1
                else:
                    c = ch.get(t)
                    if c is None:
                        if not free:
                            reserve()
                        c = free.pop()
                        par[c], cnt[c], end[c], dep[c], sq[c], st[c] = e, 1, 1, d + 1, sid, j
                        made += 1
                        ch[t] = c
                        end[e] -= 1
                    else:
                        if dep[c] == d + 1:
                            cnt[c] += 1
                            end[c] += 1
                            sq[c] = sid
                            st[c] = j
                        else:
                            if not free:
                                reserve()
                            m = free.pop()
                            par[m], cnt[m], end[m], dep[m] = e, cnt[c] + 1, 1, d + 1
                            sq[m], st[m] = sid, j
                            made += 1
                            kid[m] = {tok[sq[c]][st[c] + d + 1]: c}
                            par[c] = m
                            ch[t] = m
                            c = m
                        ends = end[e] - 1
                        end[e] = ends
                        if ends == 0 and e and len(ch) == 1:
                            self._splice(e, c, seq[j + dep[par[e]]])
                if d < last:
                    grown.append(c)
            active = grown
        self.num_nodes += made
        self.num_tokens += len(toks)
        return active

    def _splice(self, e: int, c: int, key: int) -> None:
        """Remove `e`, which no string ends at and which has the single child `c` (`key`: the
        first token of e's edge)."""
        p = self._par[e]
        self._kid[p][key] = c
        self._par[c] = p
        self._release(e)

    # ---------------------------------------------------------------- removal

    def pop_oldest(self) -> Hashable:
        """Remove the oldest stored sequence; returns its key."""
        key, sid = self._seqs.popitem(last=False)
        self._live.pop(sid, None)
        seq = self._tok[sid]
        self._remove(seq)
        if not self._seqs:  # only the root is left: no label points anywhere
            self._tok.clear()
            self._grew.clear()
            self._kept.clear()
            self._kept_tokens = 0
        elif sid in self._grew:
            # It grew after a newer sequence was stored, so a node that newer strings pass
            # through may still be labelled with it: keep its tokens until no label points there.
            self._grew.discard(sid)
            self._kept.add(sid)
            self._kept_tokens += len(seq)
            if self._kept_tokens > self._kept_check:
                self._drop_kept()
        else:
            # Every string through a node labelled `sid` came before it, from older sequences
            # (removed before it) or from itself: such nodes are gone.
            del self._tok[sid]
        return key

    def _drop_kept(self) -> None:
        """Forget the kept tokens of removed sequences that no label points into any more (a scan
        of the labels, when the kept tokens have grown by the stored ones since the last)."""
        used = set(self._sid)
        for sid in [s for s in self._kept if s not in used]:
            self._kept.discard(sid)
            self._kept_tokens -= len(self._tok.pop(sid))
        self._kept_check = self._kept_tokens + self.num_tokens + 4096

    def _remove(self, seq: list[int]) -> None:
        """Remove every string seq[j : j + max_depth], walking its path back from the root."""
        par, cnt, end, dep, sq, kid = (self._par, self._cnt, self._end, self._dep, self._sid,
                                       self._kid)
        free, splice = self._free, self._splice
        n, depth = len(seq), self.max_depth
        freed = 0
        for j in range(n):
            length = n - j
            if length > depth:
                length = depth
            v = 0
            path = []
            d = 0
            while d < length:
                v = kid[v][seq[j + d]]
                cnt[v] -= 1
                path.append(v)
                d = dep[v]
            end[v] -= 1
            for v in reversed(path):
                if cnt[v] == 0:
                    p = par[v]
                    ch = kid[p]
                    del ch[seq[j + dep[p]]]
                    if not ch:
                        kid[p] = None
                    par[v] = -1  # v's id is free (`_release`)
                    kid[v] = None
                    sq[v] = -1
                    free.append(v)
                    freed += 1
                else:
                    if end[v] == 0:
                        ch = kid[v]
                        if len(ch) == 1:
                            splice(v, next(iter(ch.values())), seq[j + dep[par[v]]])
        cnt[0] -= n
        self.num_nodes -= freed
        self.num_tokens -= n

    # ---------------------------------------------------------------- queries

    def _locate(self, ctx: list[int], s: int, length: int) -> tuple[int, int] | None:
        """Walk ctx[s : s + length] from the root: (node at or below the end, length) or None."""
        kid, dep, sq, st, tok = self._kid, self._dep, self._sid, self._st, self._tok
        v = 0
        d = 0
        while d < length:
            ch = kid[v]
            if ch is None:
                return None
            c = ch.get(ctx[s + d])
            if c is None:
                return None
            k, c0, x = dep[c], st[c], sq[c]  # read together: their cache misses overlap
            if k > length:
                k = length
            if k - d > 1:
                c0 += 1
                if tok[x][c0 + d:c0 + k - 1] != ctx[s + d + 1:s + k]:
                    return None
            v = c
            d = k
        return v, length

    def _match(self, ctx: list[int], limit: int | None = None) -> tuple[int, int]:
        n = len(ctx)
        hi = min(n, self.max_depth - 1)
        if limit is not None:
            hi = min(hi, limit)
        cnt, end, dep, sq, st, kid, tok = (self._cnt, self._end, self._dep, self._sid, self._st,
                                           self._kid, self._tok)
        best = (0, 0)
        lo = 0
        while lo < hi:  # having a continuation is monotone in the suffix length: bisect it
            mid = (lo + hi + 1) >> 1
            s = n - mid
            v = 0  # walk ctx[s:] from the root (`_locate`, inlined)
            d = 0
            while d < mid:
                ch = kid[v]
                if ch is None:
                    break
                c = ch.get(ctx[s + d])
                if c is None:
                    break
                k, c0, x = dep[c], st[c], sq[c]  # read together: their cache misses overlap
                if k > mid:
                    k = mid
                if k - d > 1:
                    c0 += 1
                    if tok[x][c0 + d:c0 + k - 1] != ctx[s + d + 1:s + k]:
                        break
                v = c
                d = k
            else:
                if dep[v] > mid or cnt[v] > end[v]:
                    best, lo = (v, mid), mid
                    continue
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
        v, length = self._match(_tail(context, self.max_depth), max_match)
        return SuffixNode(self, v), length

    def _draft(self, ctx: list[int], v: int, length: int, max_len: int,
               min_token_prob: float) -> tuple[list[int], list[float]]:
        tokens: list[int] = []
        probs: list[float] = []
        if min_token_prob > 1.0:  # the cumulative probability never exceeds 1
            return tokens, probs
        cnt, end, dep, sq, st, kid, tok = (self._cnt, self._end, self._dep, self._sid, self._st,
                                           self._kid, self._tok)
        depth = self.max_depth
        cum = 1.0
        d = length
        vd = dep[v]
        lv = -1  # the node whose label `cs[c0:]` is at hand
        while len(tokens) < max_len:
            if d == depth:
                # Paths stop at max_depth: go on from the suffix of context + draft that leaves
                # room for the rest of the draft (it occurs: it is part of the path just walked).
                full = ctx + tokens
                shorter = max(1, depth - (max_len - len(tokens)))
                v, d = self._locate(full, len(full) - shorter, shorter)
                vd = dep[v]
            if d < vd:  # inside an edge: one continuation (probability 1)
                if lv != v:
                    lv, cs, c0 = v, tok[sq[v]], st[v]
                t = cs[c0 + d]
                p = 1.0
            else:
                ch = kid[v]
                total = cnt[v] - end[v]
                if ch is None or total <= 0:
                    break
                t, nxt, best = -1, 0, 0
                for tk, c in ch.items():  # most frequent child, ties to the smaller token id
                    cc = cnt[c]
                    if cc > best or (cc == best and tk < t):
                        t, nxt, best = tk, c, cc
                p = best / total
                cum *= p
                if cum < min_token_prob:
                    break
                v = nxt
                vd = dep[v]
            tokens.append(t)
            probs.append(p)
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
        v, length = self._match(ctx)
        return self._draft(ctx, v, length, max_len, min_token_prob)

    def count(self, path: Iterable[int]) -> int:
        """How many stored strings start with `path` (0 if longer than max_depth)."""
        p = _int_list(path)
        if len(p) > self.max_depth:
            return 0
        pos = self._locate(p, 0, len(p))
        return 0 if pos is None else self._cnt[pos[0]]

    def continuations(self, path: Iterable[int]) -> dict[int, int]:
        """Next token -> number of occurrences of `path` followed by it."""
        p = _int_list(path)
        pos = self._locate(p, 0, len(p)) if len(p) < self.max_depth else None
        if pos is None:
            return {}
        v, d = pos
        cnt = self._cnt
        if d < self._dep[v]:
            return {self._tok[self._sid[v]][self._st[v] + d]: cnt[v]}
        return {t: cnt[c] for t, c in (self._kid[v] or {}).items()}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and dicts: the sequences, oldest first, and whether each is finished."""
        return {"max_depth": self.max_depth,
                "sequences": [[k, list(self._tok[sid]), sid not in self._live]
                              for k, sid in self._seqs.items()]}

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
        par, cnt, end, dep, sq, st, kid, tok = (self._par, self._cnt, self._end, self._dep,
                                                  self._sid, self._st, self._kid, self._tok)
        size = len(par)
        assert all(len(f) == size for f in (cnt, end, dep, sq, st, kid)), "field lengths"
        free = set(self._free)
        assert len(free) == len(self._free) and 0 not in free, "free list"
        assert all(par[v] == sq[v] == -1 and kid[v] is None for v in free), "cleared free ids"

        def path(v):
            return [] if v == 0 else tok[sq[v]][st[v]:st[v] + dep[v]]

        nodes = 0
        stack = [0]
        while stack:
            v = stack.pop()
            assert v not in free, "reachable free id"
            nodes += 1
            below = 0
            for t, c in (kid[v] or {}).items():
                assert par[c] == v, "parent link"
                assert dep[c] > dep[v], "depth order"
                assert tok[sq[c]][st[c] + dep[v]] == t, "edge key"
                assert cnt[c] > 0, "empty node"
                below += cnt[c]
                stack.append(c)
            assert kid[v] is None or kid[v], "empty child dict"
            assert cnt[v] == end[v] + below, "count = ends + children"
            if v:
                assert end[v] > 0 or len(kid[v] or ()) >= 2, "unary node without an end"
                assert path(v)[:dep[par[v]]] == path(par[v]), "label"
        assert nodes == self.num_nodes == size - len(free), "node count"
        assert self.num_tokens == sum(len(tok[s]) for s in self._seqs.values()), "token count"
        live = set(self._seqs.values())
        assert set(self._live) <= live and self._grew <= live, "live sequences"
        assert set(tok) == live | self._kept and not live & self._kept, "token lists"
        for e in (e for a in self._live.values() for e in a):
            assert e not in free and end[e] > 0 and dep[e] < self.max_depth, "endpoint"


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
    each indexed rollout, the rollouts recorded but not indexed yet (step, tokens; all newer than
    the indexed ones) and (step, length) of every rollout in the window."""

    __slots__ = ("tree", "steps", "queued", "lengths")

    def __init__(self, max_depth: int):
        self.tree = SuffixTree(max_depth)
        self.steps: deque[int] = deque()
        self.queued: deque[tuple[int, list[int]]] = deque()
        self.lengths: deque[tuple[int, int]] = deque()

    def drop_queued(self) -> None:
        """Drop the oldest queued rollout: every indexed one is older, so they go too (with the
        tree, not one by one)."""
        self.queued.popleft()
        if self.steps:
            self.tree = SuffixTree(self.tree.max_depth)
            self.steps.clear()


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

    A window's tree work is deferred: recording a rollout notes its length and queues its tokens,
    and a rollout that leaves the window stays in the tree; the tree catches up when a draft reads
    it (`sources`), when the state is saved, or a unit at a time in `index_some`, which the engine
    calls while it waits for the GPU. So the work leaves the RL step's critical path (as a thread,
    it took the interpreter from the trainer's update, which is bound by the host's kernel
    launches), and windows that no draft reads (a rollout that never speculates) cost nothing but
    their queues. The trees that result, and so the drafts, are those of immediate indexing: a
    window holds the newest rollouts within its step range and token cap whatever the order of
    the work.
    """

    SOURCES = ("own", "siblings", "window")

    def __init__(self, config: SuffixConfig | None = None):
        self.config = config if config is not None else SuffixConfig()
        self.step = 0
        self._prompts: OrderedDict[Hashable, _History] = OrderedDict()  # LRU: oldest first
        self._groups: dict[Hashable, _Group] = {}
        self._requests: dict[Hashable, _Request] = {}
        self._pending: dict[Hashable, list[list[int]]] = {}  # finished this step, not committed
        self._behind: dict[Hashable, None] = {}  # prompts whose tree has deferred work, in order

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
        """Drop what left the window from the lengths and the queues; a tree's rollouts that left
        it are removed with the tree's other deferred work (a prompt with none left goes whole)."""
        oldest = self.step - self.config.window_steps
        for gid in list(self._prompts):
            h = self._prompts[gid]
            while h.queued and h.queued[0][0] < oldest:
                h.drop_queued()
            while h.lengths and h.lengths[0][0] < oldest:
                h.lengths.popleft()
            if not h.lengths and not h.queued and not (h.steps and h.steps[-1] >= oldest):
                del self._prompts[gid]
                self._behind.pop(gid, None)
            elif h.steps and h.steps[0] < oldest:
                self._behind[gid] = None

    def _commit(self, group_id: Hashable, tokens: list[int], step: int) -> None:
        cfg = self.config
        h = self._prompts.get(group_id)
        if h is None:
            h = self._prompts[group_id] = _History(cfg.max_depth)
            while len(self._prompts) > cfg.max_prompts:
                self._behind.pop(self._prompts.popitem(last=False)[0], None)
        else:
            self._prompts.move_to_end(group_id)
            last = h.queued[-1][0] if h.queued else h.steps[-1] if h.steps else None
            if last is not None and step < last:
                raise ValueError(f"rollouts must be recorded in step order: {step} after {last}")
        h.lengths.append((step, len(tokens)))
        h.queued.append((step, tokens[:cfg.max_tokens_per_prompt]))
        # the token cap bounds the queue too: a rollout followed by more than the cap is out
        while sum(len(t) for _, t in h.queued) > cfg.max_tokens_per_prompt:
            h.drop_queued()
        self._behind[group_id] = None

    def _index_one(self, group_id: Hashable) -> bool:
        """One unit of a window's deferred tree work, oldest first: remove a rollout that left the
        window, else index the oldest queued one (then remove the oldest while over the token
        cap). False, and the prompt no longer behind, when there is none."""
        h = self._prompts.get(group_id)
        if h is not None:
            oldest = self.step - self.config.window_steps
            if h.steps and h.steps[0] < oldest:
                h.tree.pop_oldest()
                h.steps.popleft()
                return True
            if h.queued:
                step, tokens = h.queued.popleft()
                h.tree.add(tokens)
                h.steps.append(step)
                while h.tree.num_tokens > self.config.max_tokens_per_prompt:
                    h.tree.pop_oldest()
                    h.steps.popleft()
                return True
        self._behind.pop(group_id, None)
        return False

    def catch_up(self, group_id: Hashable | None = None) -> None:
        """Bring one prompt's window tree (None: every window) up to date."""
        if group_id is None:
            while self.index_some():
                pass
        elif group_id in self._behind:
            while self._index_one(group_id):
                pass

    def index_some(self) -> bool:
        """One unit of the windows' deferred work (a rollout indexed or removed, about 1-2 us
        per token); False when every window is up to date."""
        while self._behind:
            if self._index_one(next(iter(self._behind))):
                return True
        return False

    def add_rollout(self, group_id: Hashable, tokens: Iterable[int],
                    step: int | None = None) -> None:
        """Record a finished rollout of `group_id` (output tokens) in its window now (its tree
        catches up later), as of `step` (default: the current step). Steps must not decrease per
        prompt."""
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
        sources = self.sources(request_key, group_id)
        if not sources:
            return SuffixDraft()
        ctx = _tail(context_tokens, cfg.max_depth)
        best = SuffixDraft()
        for name, tree in sources.items():
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

    def sources(self, request_key: Hashable | None, group_id: Hashable) -> dict[str, SuffixTree]:
        """The trees a request's drafts come from, by `SuffixDraft.source` name: its own text,
        its group's live outputs, its prompt's window of earlier rollouts (those that exist)."""
        out: dict[str, SuffixTree] = {}
        req = self._requests.get(request_key) if request_key is not None else None
        if req is not None:
            out["own"] = req.tree
        group = self._groups.get(group_id)
        if group is not None:
            out["siblings"] = group.tree
        h = self._prompts.get(group_id)
        if h is not None:
            self.catch_up(group_id)
            if h.tree.num_tokens:
                out["window"] = h.tree
        return out

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
        """Tokens indexed in the windows (of one prompt, or of all), deferred work done first."""
        if group_id is not None:
            h = self._prompts.get(group_id)
            self.catch_up(group_id)
            return 0 if h is None else h.tree.num_tokens
        self.catch_up()
        return sum(h.tree.num_tokens for h in self._prompts.values())

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The step, every prompt's window (LRU order) and this step's finished outputs, as plain
        lists and dicts (JSON-serialisable when group ids are). Live requests are not saved."""
        self.catch_up()
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
        self._behind.clear()
        for entry in state["prompts"]:
            gid = _hashable(entry["group_id"])
            h = self._prompts[gid] = _History(cfg.max_depth)
            # indexed as deferred work, like newly recorded rollouts (the caps apply there)
            h.queued.extend((int(s), _int_list(toks)[:cfg.max_tokens_per_prompt]) for s, toks in entry["rollouts"])
            h.lengths.extend((int(s), int(n)) for s, n in entry["lengths"])
            self._behind[gid] = None
        while len(self._prompts) > cfg.max_prompts:
            self._behind.pop(self._prompts.popitem(last=False)[0], None)
        for gid, outs in state.get("pending", []):
            self._pending[_hashable(gid)] = [_int_list(o) for o in outs]
        self._evict_window()
