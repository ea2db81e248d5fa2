"""Atomic hot swap of drafter weights: a double buffer with a version counter.

The consumer (the engine's speculative step) drafts with the *front* copy; the trainer publishes
new weights into the *back* copy and then flips the two. A draft holds its copy for its whole
duration, and a publish waits until nobody drafts from the back copy before overwriting it, so a
draft never mixes old and new weights and always reports the version it used. Drafting never
waits for training: it only takes a lock long enough to pick the front copy.

On CUDA the weights are copied on the publisher's stream; the flip records an event there and a
draft makes its own stream wait on that event, so the new weights are complete before use.
With `graph_batch`, each copy drafts through its own `DraftGraphs` (CUDA graphs of the chain on
GPU, the same static layout run eagerly on CPU); a publish copies into the parameters in place,
so the graphs see the new weights.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from slipstream.drafter.draft_graphs import DraftGraphs
from slipstream.drafter.model import Draft, DraftContext, Drafter

__all__ = ["DrafterSlot"]


class DrafterSlot:
    """Two replicas of a drafter; `draft` uses the front one, `publish` fills the back one and flips."""

    def __init__(self, drafter: Drafter, graph_batch: int = 0):
        """`graph_batch` > 0: drafts of up to that many rows go through `DraftGraphs`."""
        self._copies = [drafter.replica().eval(), drafter.replica().eval()]
        self._graphs = [DraftGraphs(c, graph_batch) for c in self._copies] if graph_batch > 0 else None
        self._readers = [0, 0]
        self._versions = [0, 0]
        self._ready: list[torch.cuda.Event | None] = [None, None]
        self._front = 0
        self._cond = threading.Condition()
        self._publishing = threading.Lock()  # one publisher at a time

    def capture_graphs(self) -> None:
        """Capture both copies' draft graphs now (see `DraftGraphs.capture_all`); no-op without them."""
        for graphs in self._graphs or ():
            graphs.capture_all()

    @property
    def version(self) -> int:
        """Version of the weights the next draft will use (0: the initial weights)."""
        with self._cond:
            return self._versions[self._front]

    def _acquire(self) -> int:
        with self._cond:
            i = self._front
            self._readers[i] += 1
            return i

    def _release(self, i: int) -> None:
        with self._cond:
            self._readers[i] -= 1
            self._cond.notify_all()

    def draft(self, ctx: DraftContext, num_tokens: int, temperature: torch.Tensor, **kwargs) -> Draft:
        """`Drafter.draft` on the front copy; the result carries that copy's version."""
        i = self._acquire()
        try:
            ready = self._ready[i]
            if ready is not None:
                torch.cuda.current_stream().wait_event(ready)
            drafter = self._graphs[i] if self._graphs is not None else self._copies[i]
            out = drafter.draft(ctx, num_tokens, temperature, **kwargs)
            out.version = self._versions[i]
            return out
        finally:
            self._release(i)

    def publish(self, state: Mapping[str, torch.Tensor]) -> int:
        """Copy `state` (a drafter state_dict) into the back copy and make it the front one.

        Waits until no draft uses the back copy. Returns the new version.
        """
        with self._publishing:
            with self._cond:
                back = 1 - self._front
                self._cond.wait_for(lambda: self._readers[back] == 0)
                new_version = self._versions[self._front] + 1
            # Readers only take the front copy, and only this (serialised) publisher flips it: the
            # back copy is ours while we write it, without holding the lock drafts need.
            target = self._copies[back]
            with torch.no_grad():
                target.load_state_dict(state)
            ready = None
            if target.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            with self._cond:
                self._ready[back] = ready
                self._versions[back] = new_version
                self._front = back
            return new_version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights drafts currently use."""
        i = self._acquire()
        try:
            return {k: v.clone() for k, v in self._copies[i].state_dict().items()}
        finally:
            self._release(i)
