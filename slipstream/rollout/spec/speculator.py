"""The engine's speculation: suffix-tree drafts for decoding sequences, budgets from the policy.

Per engine step, `propose` asks the policy for every decoding sequence's draft budget (none while
the live batch is large) and the drafter for a draft within it; after the step, `observe` tells
the policy the step's measured throughput under the arm it chose. Per rollout (one
`Engine.generate` call, one RL step for the drafter's windows), `begin` registers the sequences
and ranks their prompts by expected length, `end` records the finished outputs in their prompts'
windows.

The drafter is kept cheap where it cannot pay off: while the batch is large, or the bandit plays
its no-speculation arm, no sequence drafts and the trees are left alone; they catch up the next
time drafts are wanted (what a sequence has not handed over yet is its output past `_fed`).
Catching up indexes a sequence's backlog in one pass (several times cheaper per token than
growing it token by token) and only for groups with a live sequence: the outputs of groups that
are done help no draft in this rollout. While the engine waits for a decode replay on the GPU,
it hands the host's idle time to `idle_work`, which catches the trees up a little at a time, so
that a drafting step finds little backlog (drafting, mostly catching up, had taken 3-10 ms of
host time per drafting step on an H200 host: several decode steps' worth). The same waits, at
any batch size, index the rollouts that earlier `end`s recorded in the windows (the drafter
defers that work): done in a thread after the rollout, it slowed the trainer's update, whose
kernel launches need the interpreter, by about as long as it ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from slipstream.kernels.attention import MAX_DECODE_Q_LEN
from slipstream.rollout.scheduler import ScheduledBatch, Scheduler
from slipstream.rollout.sequence import Sequence
from slipstream.rollout.spec.policy import PolicyConfig, SpecPolicy
from slipstream.rollout.spec.suffix_tree import SuffixConfig, SuffixDraft, SuffixDrafter

# A verification query is the last sampled token plus the draft: at most the decode kernel's width.
MAX_DRAFT_LEN = MAX_DECODE_Q_LEN - 1


@dataclass
class SpecConfig:
    """Speculation in the engine: the suffix drafter's and the policy's parameters."""

    suffix: SuffixConfig = field(default_factory=SuffixConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


class Speculator:
    """Drafts per engine step for the decoding sequences of a rollout (see the module docstring)."""

    def __init__(self, config: SpecConfig | None = None):
        self.config = config if config is not None else SpecConfig()
        self.drafter = SuffixDrafter(self.config.suffix)
        self.policy = SpecPolicy(self.config.policy)
        self._seqs: dict[int, Sequence] = {}  # this rollout's sequences by seq_id
        self._groups: dict[str, list[Sequence]] = {}  # and by group
        self._fed: dict[int, int] = {}  # output tokens the drafter has seen, per registered sequence
        self._closed: set[int] = set()  # finished sequences already handed to the drafter
        self._arm: int | None = None  # the bandit's arm for the current step (None: large batch)
        self._pending_arm: int | None = None  # a drafting arm `will_draft` chose for the next step
        self.draft_seconds = 0.0  # spent indexing and proposing in this rollout
        self.idle_seconds = 0.0  # spent catching up while the engine waited for the GPU
        # Set by the engine: hands the feature sink the captured rows still queued in the decode
        # graphs' ring (a drafter that reads features calls it before it drafts).
        self.flush_features: Callable[[], None] = lambda: None

    # ---------------------------------------------------------------- rollout lifecycle

    def begin(self, seqs: Iterable[Sequence], record: bool = True) -> None:
        """A rollout of `seqs` starts; `record`: whether it will feed the history (see `end`)."""
        self._seqs = {s.seq_id: s for s in seqs}
        self._groups = {}
        for s in self._seqs.values():
            self._groups.setdefault(s.group_id, []).append(s)
        self._fed, self._closed = {}, set()
        self._pending_arm = None
        self.draft_seconds = self.idle_seconds = 0.0
        self.policy.set_expected_lengths({g: self.drafter.expected_length(g) for g in self._groups})

    def end(self, record: bool = True) -> None:
        """Record the rollout's outputs in the drafter's windows (their indexing is deferred, see
        `idle_work`); with `record=False` forget them instead, leaving the windows and the
        drafter's step alone."""
        seqs, fed, closed = self._seqs, self._fed, self._closed
        self._seqs, self._groups, self._fed, self._closed = {}, {}, {}, set()
        if not record:
            self.drafter.discard_step()
            return
        for sid, seq in seqs.items():
            if sid in closed:
                continue
            if sid in fed:  # registered: its group's live index holds it until end_step
                self.drafter.finish_request(sid, seq.output_ids)
            else:
                self.drafter.add_rollout(seq.group_id, seq.output_ids)
        self.drafter.end_step()

    # ---------------------------------------------------------------- per step

    def _catch_up(self, live_groups: set[str]) -> None:
        """Feed the drafter every token of `live_groups` it has not seen; close the finished
        sequences. A group with no live sequence left is done for this rollout: its sequences
        are left to `end`."""
        for group_id, seqs in self._groups.items():  # in request order: the same trees every run
            if group_id in live_groups:
                for seq in seqs:
                    self._feed(seq, group_id)

    def _feed(self, seq: Sequence, group_id: str, max_tokens: int | None = None) -> bool:
        """Feed the drafter what `seq` has that it has not seen: all of it at its registration
        (one pass), else at most `max_tokens` new tokens; close it once finished and fully fed.
        Returns whether there was anything to do."""
        sid, d = seq.seq_id, self.drafter
        if sid in self._closed:
            return False
        fed, n = self._fed.get(sid), seq.num_output_tokens
        did = fed is None or n > fed
        if fed is None:
            d.add_request(sid, group_id, seq.prompt_ids, seq.output_ids)
            fed = n
        elif n > fed:
            end = n if max_tokens is None else min(n, fed + max_tokens)
            d.update(sid, seq.output_ids[fed:end])
            fed = end
        self._fed[sid] = fed
        if seq.is_finished and fed == n:
            d.finish_request(sid)
            self._closed.add(sid)
            did = True
        return did

    def idle_work(self, live: int, max_tokens: int = 32) -> bool:
        """One small unit of the drafter's catching up, for the engine to call while the GPU is
        busy, so that the wait it fills ends soon after the GPU's work: first a rollout that
        earlier rollouts recorded in the windows is indexed (at any batch size: that work is owed
        whatever happens); then, only below `min_batch_for_off` (live: the live batch), where
        drafting steps would do the same work, one sequence of a group with a live sequence
        catches up by at most about `max_tokens` tokens (a first registration indexes what the
        sequence has in one pass). Above it the live trees wait, since a sequence indexed late in
        one pass costs several times less per token than one grown token by token. Returns False
        when there was nothing to do."""
        if not self.catches_up_in_idle_time:
            return False
        t0 = time.perf_counter()
        try:
            if self.drafter.index_some():
                return True
            return live < self.policy.config.min_batch_for_off and self._catch_up_some(max_tokens)
        finally:
            self.idle_seconds += time.perf_counter() - t0

    @property
    def catches_up_in_idle_time(self) -> bool:
        """Whether the suffix trees can draft (a subclass without suffix drafts says no)."""
        return True

    def _catch_up_some(self, max_tokens: int) -> bool:
        for group_id, seqs in self._groups.items():
            if all(seq.is_finished for seq in seqs):
                continue  # done for this rollout: left to `end`, as in `_catch_up`
            for seq in seqs:
                if self._feed(seq, group_id, max_tokens):
                    return True
        return False

    def plan(self, scheduler: Scheduler) -> tuple[list[Sequence], dict[int, int], int]:
        """This step's decoding sequences, their draft budgets by seq_id (capped at MAX_DRAFT_LEN)
        and the live batch; no sequence (and no arm) while the batch is large."""
        live = scheduler.num_running + scheduler.num_waiting
        self._arm = None
        pending, self._pending_arm = self._pending_arm, None
        if live >= self.policy.config.min_batch_for_off:
            return [], {}, live
        decoding = [s for s in scheduler.running if not s.is_prefilling]
        if not decoding:
            return [], {}, live
        budgets = self.policy.plan([(s.seq_id, s.group_id) for s in decoding], live, arm=pending)
        self._arm = self.policy.arm_for(live)
        return decoding, {sid: min(n, MAX_DRAFT_LEN) for sid, n in budgets.items()}, live

    def suffix_drafts(self, scheduler: Scheduler, decoding: list[Sequence], budgets: dict[int, int]
                      ) -> dict[int, SuffixDraft]:
        """The suffix drafter's proposals within the budgets, by seq_id (sequences it has none for
        are left out)."""
        t0 = time.perf_counter()
        live_groups = {s.group_id for s in scheduler.running}
        live_groups.update(s.group_id for s in scheduler.waiting)
        self._catch_up(live_groups)
        depth = self.drafter.config.max_depth
        drafts = {}
        for s in decoding:
            budget = budgets[s.seq_id]
            if budget <= 0:
                continue
            n = s.num_tokens
            draft = self.drafter.propose(s.seq_id, s.group_id, s.token_slice(max(n - depth, 0), n), budget)
            if draft.tokens:
                drafts[s.seq_id] = draft
        self.draft_seconds += time.perf_counter() - t0
        return drafts

    def propose(self, scheduler: Scheduler) -> dict[int, list[int]]:
        """Drafts for this step's decoding sequences, by seq_id (empty while the batch is large)."""
        decoding, budgets, _ = self.plan(scheduler)
        if not any(budgets.values()):
            return {}
        return {sid: d.tokens for sid, d in self.suffix_drafts(scheduler, decoding, budgets).items()}

    def will_draft(self, live: int) -> bool:
        """Whether the next step at this live batch may draft, its arm chosen now as `plan`
        would. If not, the engine chains its decode replays as it does without speculation, and
        the steps it reads from them count for arm 0: the bandit then weighs drafting against
        the same path as `spec=off`."""
        if live >= self.policy.config.min_batch_for_off:
            self._arm = self._pending_arm = None
            return False
        self._arm = self.policy.choose_arm(live)
        # a drafting arm holds for the next step (`plan` does not draw again)
        self._pending_arm = self._arm if self._arm > 0 else None
        return self._arm > 0

    def draft_probs(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """The distributions q the scheduled drafts were drawn from, [sampling entries, K, V] with
        K the longest scheduled draft, for lossless verification; None: deterministic drafts."""
        return None

    def observe(self, batch: ScheduledBatch, live: int, seconds: float,
                emitted: list[list[int]] | None = None) -> None:
        """After a step: give the bandit the step's throughput under the arm it chose. A step of
        a multi-step replay (a batch without entries) drafted nothing and ran the path `spec=off`
        runs: it counts for arm 0, whatever `will_draft` chose meanwhile for the next replay.
        `emitted`: a verification step's tokens per sampling entry (accepted drafts, then one more)."""
        if batch.entries:
            arm = self._arm
        else:
            arm = 0 if live < self.policy.config.min_batch_for_off else None
        if arm is not None and seconds > 0:
            self.policy.record(live, arm, batch.num_emitted, seconds)

    def finished(self, seqs: list[Sequence]) -> None:
        """Sequences that ended in steps run without a ScheduledBatch (several decode steps per
        replay). Nothing to do here: the trees catch up from the scheduler."""

    def metrics(self) -> dict[str, float]:
        """What the speculator itself measured in the last rollout."""
        return {"spec/draft_seconds": self.draft_seconds, "spec/idle_catch_up_seconds": self.idle_seconds}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The drafter's windows and the policy's statistics (JSON-serialisable)."""
        return {"version": 1, "drafter": self.drafter.state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown speculation state version {state.get('version')!r} (expected 1)")
        self.drafter.load_state_dict(state["drafter"])
        self.policy.load_state_dict(state["policy"])
