"""The engine's speculator with the learned drafter as a draft source, next to the suffix tree.

`DraftingSpeculator` is the engine's `Speculator` (same lifecycle: `begin`, per step `propose` ->
`draft_probs` -> `observe`, `end`) and the engine's feature sink. Per engine step:

1. the source policy (`SourcePolicy`, a bandit per live-batch bucket) picks none / suffix /
   drafter / both, and the length policy gives each decoding sequence its budget;
2. the suffix tree proposes (suffix, both), and the learned drafter drafts one chain of k tokens
   for every sequence with a budget at once (drafter, both): its context is the newest captured
   features of each sequence (`ContextWindows`, device gathers only), its weights the front copy
   of the `DrafterSlot` for the whole chain, so a publish never mixes two versions in a draft;
3. `combine_drafts` keeps per sequence the draft of the source (both: the higher expected number
   of accepted tokens) and reads the tokens back to the host once, for the scheduler;
4. verification receives the drafter's q for its rows (`draft_probs`): lossless acceptance with
   min(1, p / q) and resampling from max(0, p - q); suffix rows are one-hot.

Features: as the engine's feature sink it writes every step's captured rows (prefill chunks,
plain decode steps, the kept positions of verification steps) into the context windows, so a
sequence can switch to drafting at any step, and, while the rollout records history, into the
training buffer. The side-stream trainer, when given, is offered every step of a recorded rollout
(it trains only where its slowdown gate allows) and publishes at the rollout's end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from slipstream.drafter.bubble_trainer import SideStreamTrainer
from slipstream.drafter.context import ContextWindows
from slipstream.drafter.feature_buffer import FeatureBuffer
from slipstream.drafter.model import Draft
from slipstream.drafter.source_policy import CombinedDraft, SourcePolicy, SourcePolicyConfig, combine_drafts
from slipstream.drafter.swap import DrafterSlot
from slipstream.rollout.model_runner import StepFeatures
from slipstream.rollout.scheduler import ScheduledBatch, Scheduler
from slipstream.rollout.sequence import Sequence
from slipstream.rollout.spec.speculator import SpecConfig, Speculator

__all__ = ["DraftingSpeculator"]


class DraftingSpeculator(Speculator):
    """See the module docstring. `vocab_size`: of the target; `max_draft_len`: the longest chain
    the learned drafter draws in a step; `generator`: of the drafts' sampling (the engine's, for
    seeded rollouts; set after the engine is built)."""

    def __init__(self, config: SpecConfig, sources: SourcePolicyConfig, slot: DrafterSlot, windows: ContextWindows,
                 vocab_size: int, max_draft_len: int, buffer: FeatureBuffer | None = None,
                 side_stream: SideStreamTrainer | None = None):
        super().__init__(config)
        self.sources = SourcePolicy(sources)
        self.slot, self.windows, self.buffer, self.side_stream = slot, windows, buffer, side_stream
        self.vocab_size, self.max_draft_len = vocab_size, max_draft_len
        self.generator: torch.Generator | None = None
        self.recording = True  # whether this rollout's features feed the training buffer
        self._source: str | None = None
        self._pending_source: str | None = None  # a drafting source `will_draft` chose for the next step
        self._combined: CombinedDraft | None = None
        self._rows: dict[int, int] = {}  # seq_id -> row of this step's combined draft
        self._reset_rollout_stats()

    def _reset_rollout_stats(self) -> None:
        self.learned_seconds = 0.0  # host time launching the learned drafter's chains
        self._accept: dict[str, list[int]] = {}  # source -> [accepted, drafted, verifications]
        self._source_steps: dict[str, int] = {}
        self.versions: set[int] = set()  # drafter weight versions this rollout drafted with

    # ---------------------------------------------------------------- features (the engine's sink)

    def __call__(self, features: StepFeatures) -> None:
        self.windows(features)
        if self.buffer is not None and self.recording:
            self.buffer(features)

    # ---------------------------------------------------------------- rollout lifecycle

    def begin(self, seqs: Iterable[Sequence], record: bool = True) -> None:
        super().begin(seqs)
        self._pending_source = None
        self.recording = record
        self.windows.clear()
        self._reset_rollout_stats()

    def end(self, record: bool = True) -> None:
        super().end(record)
        self.windows.clear()
        if self.side_stream is not None and self.recording:
            self.side_stream.end_rollout()  # publishes what the tail trained
        self.recording = True

    # ---------------------------------------------------------------- per step

    def propose(self, scheduler: Scheduler) -> dict[int, list[int]]:
        """Drafts of this step's decoding sequences from the source the policy picks, by seq_id."""
        self._source, self._combined, self._rows = None, None, {}
        live = scheduler.num_running + scheduler.num_waiting
        self._arm = None
        pending, self._pending_source = self._pending_source, None
        if live >= self.policy.config.min_batch_for_off or not any(not s.is_prefilling for s in scheduler.running):
            return {}
        source = self._source = pending if pending is not None else self.sources.choose(live)
        self._source_steps[source] = self._source_steps.get(source, 0) + 1
        if source == "none":
            return {}
        decoding, budgets, _ = self.plan(scheduler)
        drafting = [s for s in decoding if budgets.get(s.seq_id, 0) > 0]
        if not drafting:
            return {}
        wanted = [budgets[s.seq_id] for s in drafting]
        suffix = None
        if source in ("suffix", "both"):
            found = self.suffix_drafts(scheduler, drafting, budgets)
            suffix = [found.get(s.seq_id) for s in drafting]
        learned = None
        if source in ("drafter", "both"):
            learned = self._learned_draft(drafting, min(max(wanted), self.max_draft_len))
        combined = combine_drafts(source, wanted, self.vocab_size, suffix=suffix, drafter=learned,
                                  device=self.windows.device)
        self._combined = combined
        self._rows = {s.seq_id: b for b, s in enumerate(drafting)}
        return {s.seq_id: d for s, d in zip(drafting, combined.drafts) if d}

    @property
    def catches_up_in_idle_time(self) -> bool:
        return any(s in self.sources.config.sources for s in ("suffix", "both"))

    def will_draft(self, live: int) -> bool:
        """Whether the next step at this live batch may draft: the source policy chooses now, as
        `propose` would. If it picks "none", the engine chains its decode replays as without
        speculation; their features still reach the context windows and the training buffer, so
        a later step can draft from them, and their steps count for "none"."""
        self._arm, self._combined, self._rows = None, None, {}
        if live >= self.policy.config.min_batch_for_off:
            self._source = self._pending_source = None
            return False
        self._source = self.sources.choose(live)
        if self._source == "none":
            self._source_steps["none"] = self._source_steps.get("none", 0) + 1
            self._pending_source = None
            return False
        self._pending_source = self._source  # it holds for the next step (`propose` does not draw again)
        return True

    def _learned_draft(self, seqs: list[Sequence], k: int) -> Draft:
        """One chain of k tokens for every sequence of `seqs`, batched, with their sampling parameters."""
        t0 = time.perf_counter()
        self.flush_features()  # the windows then hold every step the sequences decoded
        device = self.windows.device
        keys = [(s.request_id, s.sample_index) for s in seqs]
        params = [s.params for s in seqs]
        last = torch.tensor([s.last_token for s in seqs], dtype=torch.long).to(device, non_blocking=True)
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device, non_blocking=True)
        extra = {}
        if any(p.truncates for p in params):
            extra["top_p"] = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device)
            extra["top_k"] = torch.tensor([p.top_k for p in params], dtype=torch.long).to(device)
        draft = self.slot.draft(self.windows.context(keys, last), k, temperature, generator=self.generator, **extra)
        self.versions.add(draft.version)
        self.learned_seconds += time.perf_counter() - t0
        return draft

    def draft_probs(self, batch: ScheduledBatch) -> torch.Tensor | None:
        c = self._combined
        if c is None or c.probs is None:
            return None
        sampling = batch.sampling
        K = max(len(e.draft) for e in sampling)
        rows = [self._rows.get(e.seq.seq_id, 0) if e.draft else 0 for e in sampling]
        index = torch.tensor(rows, dtype=torch.long).to(c.probs.device, non_blocking=True)
        return c.probs[index, :K]

    def observe(self, batch: ScheduledBatch, live: int, seconds: float,
                emitted: list[list[int]] | None = None) -> None:
        super().observe(batch, live, seconds, emitted)
        # a replay's steps drafted nothing: they count for "none" (see Speculator.observe)
        source = self._source if batch.entries else "none"
        if self._source is not None and seconds > 0:
            self.sources.record(live, source, batch.num_emitted, seconds)
        if emitted is not None and self._combined is not None:
            for e, out in zip(batch.sampling, emitted):
                if e.draft:
                    source = self._combined.sources[self._rows[e.seq.seq_id]]
                    a = self._accept.setdefault(source, [0, 0, 0])
                    a[0] += len(out) - 1
                    a[1] += len(e.draft)
                    a[2] += 1
        self.finished([e.seq for e in batch.entries if e.seq.is_finished])
        if self.side_stream is not None and self.recording:
            self.side_stream.on_step(live)

    def finished(self, seqs: list[Sequence]) -> None:
        """Give back the drafting windows of sequences that ended."""
        if seqs:
            self.windows.release([(s.request_id, s.sample_index) for s in seqs])

    def metrics(self) -> dict[str, float]:
        """Per draft source: accepted draft tokens per verification (acceptance length), accepted
        over drafted, and how often the source policy chose it (once per engine step, or per chained
        multi-step replay for "none"); the learned drafter's launch time and
        the newest weight version it drafted with."""
        out = super().metrics()
        out["spec/learned_draft_seconds"] = self.learned_seconds
        for source, (accepted, drafted, verifications) in sorted(self._accept.items()):
            out[f"spec/{source}/acceptance_len"] = accepted / verifications if verifications else 0.0
            out[f"spec/{source}/acceptance_rate"] = accepted / drafted if drafted else 0.0
            out[f"spec/{source}/drafted_tokens"] = float(drafted)
        for source, n in sorted(self._source_steps.items()):
            out[f"spec/source_steps/{source}"] = float(n)
        if self.versions:
            out["spec/drafter/version"] = float(max(self.versions))
        return out

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sources": self.sources.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("sources") is not None:
            self.sources.load_state_dict(state["sources"])
