"""Paged KV cache bookkeeping: a free list, reference counts, and prefix sharing of full blocks.

Prefix sharing: once a block is FULL of tokens whose K/V are computed (or scheduled to be computed
in the current step), it gets a chained content hash, hash((hash of the previous block, its token
ids)), and is entered in a map hash -> block. A sequence being allocated walks its own chain and
takes every leading block found in the map instead of a fresh one (refcount + 1); those tokens
count as cached and are not prefilled. So the n samples of a GRPO group prefill their prompt once,
and a later group with the same prompt reuses it while the blocks still hold it.

Only full blocks are ever shared, and a sequence only writes K/V at positions >= its
num_cached_tokens, which lie outside every block it shares: no copy-on-write is needed. The block
holding a sequence's last token is never taken from the map: that token is always computed, so
there are logits to sample from.

Speculative decoding writes draft tokens' K/V into slots past a sequence's tokens. Those blocks
are never registered while they hold drafts: `commit` only covers accepted tokens, and
`truncate` frees the blocks that only rejected drafts used.

Freed blocks (refcount 0) go back to the free list but keep their hash entry, so a recently
finished prefix can still be hit (such a hit takes the block back off the free list). Allocation
takes the least recently freed block, unhashed ones first; reusing a hashed block drops its entry.
"""

from __future__ import annotations

from collections import OrderedDict

from slipstream.rollout.sequence import Sequence

_ROOT = 0x5EED


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._block_key: list[tuple | None] = [None] * num_blocks  # (prev hash, tokens): checked on a hit
        self.hash_to_block: dict[int, int] = {}
        self._root = _ROOT  # hash seed of the first block of every chain; changed by reset_prefix_cache
        # Free blocks in eviction order (front is taken first); values unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Counters: prompt/context tokens looked up on allocation and how many of them were hits.
        self.num_lookup_tokens = 0
        self.num_hit_tokens = 0

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def is_free(self, block: int) -> bool:
        return block in self._free

    # ---- hashing -------------------------------------------------------------------------------
    def _key(self, seq: Sequence, index: int, prev: int) -> tuple:
        bs = self.block_size
        return prev, tuple(seq.token_slice(index * bs, (index + 1) * bs))

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Leading blocks of `seq` found in the cache, never the one holding its last token."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        prev = self._root
        for i in range((seq.num_tokens - 1) // self.block_size):
            key = self._key(seq, i, prev)
            h = hash(key)
            block = self.hash_to_block.get(h)
            if block is None or self._block_key[block] != key:
                break
            hits.append(block)
            prev = h
        return hits

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """Register the blocks of `seq` that are full once its first `num_computed` tokens are computed.

        Called when a step that computes tokens up to `num_computed` is scheduled (before
        `seq.num_cached_tokens` is advanced): the model runner stores every K/V of a step before
        any attention of that step reads the cache, so a block is readable by other sequences in
        the very step that fills it.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = seq.block_table
        for i in range(seq.num_cached_tokens // bs, min(num_computed // bs, len(table))):
            block = table[i]
            if self.block_hash[block] is not None:  # a hit, or registered by an earlier step
                continue
            prev = self.block_hash[table[i - 1]] if i > 0 else self._root
            key = self._key(seq, i, prev)
            h = hash(key)
            self.block_hash[block] = h
            self._block_key[block] = key
            self.hash_to_block.setdefault(h, block)  # an equal block already there stays the entry

    # ---- blocks --------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # reused for new content: its old prefix is gone
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self._block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            self._free[block] = None
            if self.block_hash[block] is None:  # nothing worth keeping: reuse it first
                self._free.move_to_end(block, last=False)

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of `seq`'s tokens are available (prefix hits included)."""
        hits = self._prefix_hits(seq)
        in_use = sum(1 for b in hits if self.ref_counts[b] > 0)
        return seq.num_blocks_needed(self.block_size) - in_use <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks.

        Sets `seq.num_cached_tokens` to the number of prefix tokens found in the cache (whole
        blocks, always fewer than `seq.num_tokens`).
        """
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free blocks for {seq!r}: {self.num_free_blocks} free")
        hits = self._prefix_hits(seq)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
        table = hits + [self._take_free_block()
                        for _ in range(seq.num_blocks_needed(self.block_size) - len(hits))]
        seq.block_table = table
        seq.num_cached_tokens = len(hits) * self.block_size
        self.num_lookup_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_cached_tokens

    def blocks_to_grow(self, seq: Sequence, num_lookahead: int = 0) -> int:
        """New blocks `seq`'s next step needs for its last token and `num_lookahead` tokens after it."""
        return max(seq.num_blocks_needed(self.block_size, seq.num_tokens + num_lookahead) - len(seq.block_table), 0)

    def can_append(self, seq: Sequence, num_lookahead: int = 0) -> bool:
        """Whether `seq`'s next step (computing its last token and `num_lookahead` draft tokens
        after it) has slots for them."""
        return self.blocks_to_grow(seq, num_lookahead) <= len(self._free)

    def may_append(self, seq: Sequence, num_lookahead: int = 0) -> None:
        """Before a decode step: add the blocks its last token and `num_lookahead` draft tokens
        start; register the block that the last token fills.

        Draft tokens are never registered: a block is entered in the prefix map only once it is
        full of accepted tokens (`commit` after verification).
        """
        grow = self.blocks_to_grow(seq, num_lookahead)
        if grow > len(self._free):
            raise RuntimeError(f"no free block to grow {seq!r} by {num_lookahead + 1} tokens")
        for _ in range(grow):
            seq.block_table.append(self._take_free_block())
        self.commit(seq, seq.num_tokens)

    def truncate(self, seq: Sequence) -> None:
        """Free the blocks past those holding `seq`'s tokens (slots taken for rejected drafts).

        Those blocks were never registered (they held draft tokens only), so they go to the
        front of the free list.
        """
        keep = seq.num_blocks_needed(self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.block_hash[block] is None, f"block {block} of rejected drafts was registered"
            self._release(block)

    def deallocate(self, seq: Sequence) -> None:
        """Release all of `seq`'s blocks (tail first, so a chain's head is evicted last)."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: call it when the model weights change.

        Chains start from a new seed afterwards, so no later lookup can reach a block computed
        before the reset, including blocks that running sequences still hold and keep extending.
        """
        self._root = hash((self._root, "reset"))
        self.hash_to_block.clear()
        for block in range(self.num_blocks):
            if self.ref_counts[block] == 0:
                self.block_hash[block] = None
                self._block_key[block] = None
