"""Continuous batching with chunked prefill and preemption by recompute.

Every step, `schedule()` picks the work of one model forward:
  1. running decodes, oldest first, one token each; a decode that needs a new block and finds
     none preempts the most recently started running sequence(s) (its blocks are freed and it
     goes back to the FRONT of the waiting queue, keeping its generated tokens, which are
     prefilled again with the prompt on readmission);
  2. the next chunk of running sequences whose prefill spans several steps;
  3. waiting sequences, first come first served, while sequences, blocks and tokens allow (not in
     a step that had to preempt).
No sequence computes more than `chunk_size` tokens in a step, and a step computes at most
`max_num_batched_tokens` tokens for at most `max_num_seqs` running sequences. A sequence samples
a token in the step that computes its last uncached token (the end of a prefill, or a decode).

The oldest running sequence is never preempted by another one, so it always progresses: no
deadlock. A sequence that alone needs more blocks than the whole cache raises an error.

Contract with the model runner: within each layer, all K/V of a step are stored (slot_mapping)
before any attention of the step reads the cache, as in slipstream/kernels/reference.py. A
sequence admitted in a step may then reuse prefix blocks that another sequence fills in that same
step (the n samples of a group admitted together prefill their prompt once).

`postprocess()` appends the sampled tokens, finishes sequences on a stop token ("stop"), on
`max_tokens` or on `max_model_len` ("length"), and frees their blocks.

Speculative steps: `schedule(drafts)` gives a decoding sequence with a draft of k tokens a query
of 1 + k tokens (its last sampled token, then the draft), within the token budget, the decode
kernel's query limit, and the room left by max_tokens and max_model_len; a draft never costs
another sequence its step: it leaves each running sequence still to be scheduled a token of the
budget and a free block, and is dropped rather than preempting anyone. After the
verification, `postprocess_verified()` appends each sequence's emitted tokens (its accepted
drafts, then the replacement or bonus token) up to a finish, and rolls the rejected positions
back: `num_cached_tokens` becomes the accepted context, blocks taken only for rejected slots are
freed, and blocks that filled up with accepted tokens are registered for prefix sharing (a block
is never registered while it holds draft tokens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from slipstream.kernels.attention import MAX_DECODE_Q_LEN
from slipstream.rollout.block_manager import BlockManager
from slipstream.rollout.sequence import Sequence, SequenceStatus


class ScheduledSeq(NamedTuple):  # a tuple: built for every sequence of every step, cheaply
    seq: Sequence
    start: int  # seq.num_cached_tokens when scheduled: this step computes tokens [start, start + num_new)
    num_new: int
    samples: bool  # start + num_new == seq.num_tokens: the last row's logits give the next token
    # Draft tokens fed after the last sampled token (a speculative decode): num_new = 1 + len(draft),
    # and the last len(draft) + 1 rows' logits verify the draft.
    draft: tuple[int, ...] = ()


@dataclass
class ModelInputs:
    """The packed tensors of one step (see slipstream/kernels/reference.py for their meaning)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [S, max blocks] int32, padded with -1
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot each new token's K/V is stored to
    sample_indices: torch.Tensor  # [num sampling seqs] int64: rows of the packed tokens to sample
    max_q_len: int
    max_seq_len: int


@dataclass
class ScheduledBatch:
    entries: list[ScheduledSeq]
    block_size: int
    preempted: list[Sequence] = field(default_factory=list)  # preempted while scheduling this step
    done: bool = False  # set by postprocess; the sequences have moved on since
    # Set by schedule: draft tokens to verify, and the sequences they belong to.
    num_draft_tokens: int = 0
    num_drafting_seqs: int = 0
    # Set by postprocess: tokens appended to sequences, and accepted draft tokens among them.
    num_emitted: int = 0
    num_accepted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new for e in self.entries)

    @property
    def num_seqs(self) -> int:
        return len(self.entries)

    @property
    def sampling(self) -> list[ScheduledSeq]:
        """Entries that sample a token, in the order of `sample_indices` and of postprocess's tokens."""
        return [e for e in self.entries if e.samples]

    def __len__(self) -> int:
        return len(self.entries)

    def build_inputs(self, device: torch.device | str | None = None) -> ModelInputs:
        """Model inputs of this step. Call it before `Scheduler.postprocess` of this batch."""
        if self.done:
            raise RuntimeError("build_inputs after postprocess: the sequences have already moved on")
        bs = self.block_size
        q_lens = [e.num_new for e in self.entries]
        starts = [e.start for e in self.entries]
        input_ids: list[int] = []
        for e in self.entries:
            input_ids.extend(e.seq.token_slice(e.start, e.start + e.num_new - len(e.draft)))
            input_ids.extend(e.draft)
        width = max((len(e.seq.block_table) for e in self.entries), default=0)
        tables = [e.seq.block_table + [-1] * (width - len(e.seq.block_table)) for e in self.entries]

        n_seqs = len(self.entries)
        q = torch.tensor(q_lens, dtype=torch.int64)
        cu = torch.zeros(n_seqs + 1, dtype=torch.int64)
        torch.cumsum(q, 0, out=cu[1:])
        seq_lens = torch.tensor(starts, dtype=torch.int64) + q
        block_tables = torch.tensor(tables, dtype=torch.int64).reshape(n_seqs, width)
        rows = torch.arange(int(cu[-1]))
        owner = torch.searchsorted(cu[1:], rows, right=True)  # sequence of each packed row
        positions = rows - cu[owner] + (seq_lens - q)[owner]
        slot_mapping = block_tables[owner, positions // bs] * bs + positions % bs
        sample_indices = (cu[1:] - 1)[torch.tensor([e.samples for e in self.entries], dtype=torch.bool)]

        out = ModelInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=positions,
            cu_seqlens_q=cu.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=block_tables.to(torch.int32),
            slot_mapping=slot_mapping,
            sample_indices=sample_indices,
            max_q_len=max(q_lens, default=0),
            max_seq_len=int(seq_lens.max()) if n_seqs else 0,
        )
        if device is not None and torch.device(device).type != "cpu":
            for name in ("input_ids", "positions", "cu_seqlens_q", "seq_lens", "block_tables",
                         "slot_mapping", "sample_indices"):
                setattr(out, name, getattr(out, name).to(device, non_blocking=True))
        return out


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, chunk_size: int | None = None, *,
                 eos_token_ids: Iterable[int] = (), max_model_len: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"need max_num_seqs >= 1 and max_num_batched_tokens >= 1, "
                             f"got {max_num_seqs}, {max_num_batched_tokens}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size or max_num_batched_tokens
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one started most recently
        self.num_preemptions = 0
        self.num_steps = 0

    # ---- queue ---------------------------------------------------------------------------------
    def add(self, seqs: Sequence | Iterable[Sequence]) -> None:
        seqs = [seqs] if isinstance(seqs, Sequence) else list(seqs)
        capacity = self.block_manager.num_blocks * self.block_size
        for seq in seqs:  # validate all before queueing any
            if seq.status is not SequenceStatus.WAITING or seq.block_table:
                raise ValueError(f"only new waiting sequences can be added, got {seq!r}")
            n = seq.num_tokens
            if self.max_model_len is not None and n >= self.max_model_len:
                raise ValueError(
                    f"request {seq.request_id!r} (sequence {seq.seq_id}): prompt of {n} tokens is "
                    f"{'longer than' if n > self.max_model_len else 'as long as'} max_model_len="
                    f"{self.max_model_len}, leaving no room to generate")
            if n > capacity:
                raise ValueError(
                    f"request {seq.request_id!r} (sequence {seq.seq_id}): prompt of {n} tokens can never "
                    f"fit the KV cache of {self.block_manager.num_blocks} blocks x {self.block_size} "
                    f"= {capacity} tokens")
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_all(self) -> None:
        """Drop every queued and running sequence (their blocks go back to the pool); they end
        with finish_reason "abort"."""
        dropped = [*self.running, *self.waiting]
        for seq in dropped:
            if seq.block_table:
                self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        self.running, self.waiting = [], deque()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step ------------------------------------------------------------------------------
    def _never_fits(self, seq: Sequence, num_tokens: int) -> RuntimeError:
        bm = self.block_manager
        return RuntimeError(
            f"request {seq.request_id!r} (sequence {seq.seq_id}) needs {num_tokens} tokens of context "
            f"({seq.num_prompt_tokens} prompt + {seq.num_output_tokens} generated), more than the whole "
            f"KV cache of {bm.num_blocks} blocks x {bm.block_size} = {bm.num_blocks * bm.block_size} "
            f"tokens; enlarge the cache or set max_model_len <= {bm.num_blocks * bm.block_size}")

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _draft_room(self, seq: Sequence, draft: Sequence_[int], budget: int) -> int:
        """How many of `draft`'s tokens this step can verify: every emitted token must be able to
        count (max_tokens, max_model_len), and the query must fit the budget and the decode kernel."""
        room = min(len(draft), budget - 1, MAX_DECODE_Q_LEN - 1,
                   seq.params.max_tokens - seq.num_output_tokens - 1)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - seq.num_tokens - 1)
        return max(room, 0)

    def schedule(self, drafts: Mapping[int, Sequence_[int]] | None = None) -> ScheduledBatch:
        """The next step's work; `drafts` maps a decoding sequence's `seq_id` to draft tokens to
        verify after its last sampled token (see the module docstring)."""
        bm = self.block_manager
        batch = ScheduledBatch(entries=[], block_size=self.block_size)
        budget = self.max_num_batched_tokens
        entries = batch.entries

        # 1. Decodes, oldest first; growing one may preempt the newest running sequences.
        running = self.running
        bs = self.block_size
        prefilling: list[Sequence] = []  # visited running sequences whose prefill spans steps
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = seq.num_tokens
            if n - seq.num_cached_tokens > 1:
                prefilling.append(seq)
                i += 1
                continue
            draft = drafts.get(seq.seq_id, ()) if drafts else ()
            later = len(running) - i - 1
            # A draft leaves each later running sequence a token of the budget and a block for its own
            # next token.
            k = self._draft_room(seq, draft, budget - later) if draft else 0
            if k and bm.blocks_to_grow(seq, k) + later <= bm.num_free_blocks:
                bm.may_append(seq, k)
                entries.append(ScheduledSeq(seq, seq.num_cached_tokens, 1 + k, True, tuple(draft[:k])))
                batch.num_draft_tokens += k
                batch.num_drafting_seqs += 1
                budget -= 1 + k
                i += 1
                continue
            if len(seq.block_table) * bs >= n:  # the common case: its last token's slot is held already
                if n % bs == 0:
                    bm.commit(seq, n)  # that token fills its block: register it, as may_append would
                entries.append(ScheduledSeq(seq, n - 1, 1, True))
                budget -= 1
                i += 1
                continue
            while not bm.can_append(seq):
                if len(running) == 1:
                    raise self._never_fits(seq, seq.num_tokens)
                victim = running.pop()  # most recently started; not scheduled yet in this step
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                bm.may_append(seq)
                entries.append(ScheduledSeq(seq, seq.num_cached_tokens, 1, True))
                budget -= 1
                i += 1

        # 2. Running prefills that span several steps (all visited above unless the budget ran out).
        for seq in prefilling:
            if budget == 0:
                break
            n = min(seq.num_uncached_tokens, self.chunk_size, budget)
            entries.append(self._prefill_entry(seq, n))
            budget -= n

        # 3. Admission, first come first served (a preempted sequence is at the front).
        while self.waiting and budget > 0 and not batch.preempted and len(running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_blocks_needed(self.block_size) > bm.num_blocks:
                raise self._never_fits(seq, seq.num_tokens)
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            n = min(seq.num_uncached_tokens, self.chunk_size, budget)
            entries.append(self._prefill_entry(seq, n))
            budget -= n

        self.num_steps += 1
        return batch

    def _prefill_entry(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_cached_tokens
        self.block_manager.commit(seq, start + n)
        return ScheduledSeq(seq, start, n, start + n == seq.num_tokens)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.eos_token_ids or token in seq.params.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.params.max_tokens:
            return "length"
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int],
                    logprobs: list[float] | None = None) -> list[Sequence]:
        """Apply one step's results: `token_ids[k]` (and `logprobs[k]`) is the token sampled at
        `sample_indices[k]`, i.e. for `batch.sampling[k]`. Returns the sequences finished now."""
        if batch.done:
            raise RuntimeError("this batch was already postprocessed")
        if batch.num_draft_tokens:
            raise ValueError("this batch verifies draft tokens: use postprocess_verified")
        sampling = batch.sampling
        if len(token_ids) != len(sampling) or (logprobs is not None and len(logprobs) != len(sampling)):
            raise ValueError(f"expected {len(sampling)} sampled tokens (and logprobs), got {len(token_ids)}"
                             f"{'' if logprobs is None else f' and {len(logprobs)}'}")
        batch.done = True
        batch.num_emitted = len(sampling)
        for e in batch.entries:
            assert e.seq.status is SequenceStatus.RUNNING and e.seq.num_cached_tokens == e.start, e.seq
            e.seq.num_cached_tokens = e.start + e.num_new
        finished: list[Sequence] = []
        for k, e in enumerate(sampling):
            seq, token = e.seq, int(token_ids[k])
            seq.append_token(token, None if logprobs is None else logprobs[k])
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.block_manager.deallocate(seq)
                seq.finish(reason)
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished

    def postprocess_steps(self, seqs: list[Sequence], tokens: list[list[int]],
                          logprobs: list[list[float]]) -> tuple[list[Sequence], list[int]]:
        """Apply several decode steps computed in one replay: `tokens[k][i]` (and `logprobs[k][i]`)
        was drawn for `seqs[i]` at step k. The same as `schedule()` + `postprocess()` step by step
        when every running sequence decodes and nothing waits, in one pass per sequence: each takes
        its draws up to its finish (the rest are discarded). Their blocks must already hold the
        steps' slots (`BlockManager.may_append(seq, steps - 1)`). Returns (the sequences finished,
        the number of live sequences at each step)."""
        steps, bm = len(tokens), self.block_manager
        live = [0] * steps
        finished: list[Sequence] = []
        for i, seq in enumerate(seqs):
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefilling:
                raise ValueError(f"{seq!r} is not decoding")
            for k in range(steps):
                live[k] += 1
                bm.commit(seq, seq.num_tokens)  # the step computes the last token: register the block it fills
                seq.num_cached_tokens = seq.num_tokens
                token = int(tokens[k][i])
                seq.append_token(token, logprobs[k][i])
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    bm.deallocate(seq)
                    seq.finish(reason)
                    finished.append(seq)
                    break
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        self.num_steps += sum(1 for n in live if n)
        return finished, live

    def postprocess_verified(self, batch: ScheduledBatch, emitted: list[list[int]],
                             logprobs: list[list[float]] | None = None) -> list[Sequence]:
        """Apply one step's results: `emitted[k]` (and `logprobs[k]`) are the tokens produced for
        `batch.sampling[k]`: the first len(draft) of its draft that were accepted, then one
        sampled token. Tokens after a finish are dropped; rejected positions are rolled back.
        Returns the sequences finished now."""
        if batch.done:
            raise RuntimeError("this batch was already postprocessed")
        sampling = batch.sampling
        if len(emitted) != len(sampling) or (logprobs is not None and len(logprobs) != len(sampling)):
            raise ValueError(f"expected results for {len(sampling)} sampling sequences, got {len(emitted)}"
                             f"{'' if logprobs is None else f' and {len(logprobs)} logprob lists'}")
        for k, e in enumerate(sampling):
            if not 1 <= len(emitted[k]) <= len(e.draft) + 1 or (
                    logprobs is not None and len(logprobs[k]) != len(emitted[k])):
                raise ValueError(f"sequence {e.seq.seq_id} with a draft of {len(e.draft)} tokens: got "
                                 f"{len(emitted[k])} emitted tokens (1..{len(e.draft) + 1} expected)"
                                 f"{'' if logprobs is None else f' and {len(logprobs[k])} logprobs'}")
            if list(emitted[k][:-1]) != list(e.draft[:len(emitted[k]) - 1]):
                raise ValueError(f"sequence {e.seq.seq_id}: emitted tokens {list(emitted[k])} do not start "
                                 f"with the accepted part of its draft {list(e.draft)}")
        batch.done = True
        for e in batch.entries:
            assert e.seq.status is SequenceStatus.RUNNING and e.seq.num_cached_tokens == e.start, e.seq
            if not e.draft:
                e.seq.num_cached_tokens = e.start + e.num_new
        bm = self.block_manager
        finished: list[Sequence] = []
        for k, e in enumerate(sampling):
            seq = e.seq
            reason = None
            for j, token in enumerate(emitted[k]):
                token = int(token)
                seq.append_token(token, None if logprobs is None else logprobs[k][j])
                batch.num_emitted += 1
                batch.num_accepted += j < len(emitted[k]) - 1
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    break
            if reason is not None:
                bm.deallocate(seq)
                seq.finish(reason)
                finished.append(seq)
            elif e.draft:
                # The last sampled token and the accepted drafts are computed; the rest rolls back.
                accepted_context = e.start + len(emitted[k])
                bm.commit(seq, accepted_context)
                seq.num_cached_tokens = accepted_context
                bm.truncate(seq)
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished
