"""The drafting context of live sequences, kept on the device as the engine computes features.

`ContextWindows` is a `feature_sink` (run it next to the `FeatureBuffer`) that keeps, per live
sequence, the features of its last `window` positions in a device ring indexed by position
modulo the window. Writing a step costs a few device ops and one small host-to-device copy of the
step's slot numbers; building the `DraftContext` of a batch of sequences is device gathers only,
so neither adds a host sync to the decode loop.

A step may carry more than `window` rows of one sequence (a prefill chunk): only its newest
`window` rows are written (the others go to a scratch row), so no two writes of a step land in
the same cell. A position computed again (recompute after preemption) overwrites its cell. A
sequence whose prefix was computed by a sibling (prefix sharing) holds features from its first
computed position on, and its context starts there.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from slipstream.drafter.model import DraftContext
from slipstream.rollout.model_runner import StepFeatures

__all__ = ["ContextWindows"]

_NO_POSITION = 2**62


class ContextWindows:
    """Per-sequence rings of the last `window` features of capture layer `layer`, on `device`.

    Slots are taken by the first step that carries a sequence and given back by `release` (or
    `clear`); the rings grow when more sequences are live than `max_seqs`.
    """

    def __init__(self, window: int, hidden_size: int, layer: int = -1, max_seqs: int = 256,
                 dtype: torch.dtype = torch.float32, device=None):
        if window < 1 or max_seqs < 1:
            raise ValueError(f"window and max_seqs must be >= 1, got {window} and {max_seqs}")
        self.window, self.layer = window, layer
        self.hidden_size, self.dtype = hidden_size, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        # Sequences given back: rows of theirs that arrive later (the engine hands queued rows
        # over lazily) are dropped rather than given a slot nobody would release.
        self._released: set[Hashable] = set()
        self._allocate(max_seqs)

    def _allocate(self, n: int) -> None:
        """Rings for n sequences plus one scratch row (index n) that absorbs writes to drop."""
        kw = dict(device=self.device)
        hidden = torch.zeros(n + 1, self.window, self.hidden_size, dtype=self.dtype, **kw)
        tokens = torch.zeros(n + 1, self.window, dtype=torch.long, **kw)
        newest = torch.full((n + 1,), -1, dtype=torch.long, **kw)
        first = torch.full((n + 1,), _NO_POSITION, dtype=torch.long, **kw)
        old = getattr(self, "capacity", 0)
        if old:
            hidden[:old], tokens[:old] = self._hidden[:old], self._tokens[:old]
            newest[:old], first[:old] = self._newest[:old], self._first[:old]
        self._hidden, self._tokens, self._newest, self._first = hidden, tokens, newest, first
        self._free.extend(range(n - 1, old - 1, -1))
        self.capacity = n

    def _slot(self, key: Hashable) -> int:
        slot = self._slots.get(key)
        if slot is None:
            if not self._free:
                self._allocate(2 * self.capacity)
            slot = self._slots[key] = self._free.pop()
            self._newest[slot] = -1
            self._first[slot] = _NO_POSITION
        return slot

    def __call__(self, features: StepFeatures) -> None:
        hidden = features.hidden.get(self.layer)
        if hidden is None:
            raise KeyError(f"the drafting context reads capture layer {self.layer}, the engine captured "
                           f"{sorted(features.hidden)}")
        if hidden.shape[0] == 0:
            return
        ids = [-1 if k in self._released else self._slot(k) for k in features.seq_keys]
        slots = torch.tensor([i if i >= 0 else self.capacity for i in ids], dtype=torch.long)  # scratch
        slots = slots.to(self.device, non_blocking=True)[features.owner.to(self.device)]
        pos = features.positions.to(self.device)
        # Only each sequence's newest `window` rows of this step are written (distinct cells).
        step_newest = torch.full_like(self._newest, -1).scatter_reduce(0, slots, pos, "amax")
        keep = pos > step_newest[slots] - self.window
        scratch = self.capacity
        rows = torch.where(keep, slots, scratch)
        cols = pos % self.window
        self._hidden[rows, cols] = hidden.to(self.dtype)
        self._tokens[rows, cols] = features.token_ids.to(self.device)
        self._newest.scatter_reduce_(0, slots, pos, "amax")
        self._first.scatter_reduce_(0, slots, pos, "amin")

    def release(self, keys: Sequence[Hashable]) -> None:
        """Give back the slots of finished sequences."""
        for key in keys:
            slot = self._slots.pop(key, None)
            if slot is not None:
                self._free.append(slot)
            self._released.add(key)

    def clear(self) -> None:
        """Forget every sequence (end of a rollout)."""
        self.release(list(self._slots))
        self._released.clear()

    def context(self, keys: Sequence[Hashable], last_tokens: torch.Tensor) -> DraftContext:
        """The DraftContext of sequences `keys`, whose newest tokens x_n (sampled after the newest
        captured feature h_{n-1}, not yet fed) are `last_tokens` [B]. Every sequence needs at least
        one captured feature."""
        missing = [k for k in keys if k not in self._slots]
        if missing:
            raise KeyError(f"no features captured for sequences {missing[:4]}{'...' if len(missing) > 4 else ''}")
        W = self.window
        slots = torch.tensor([self._slots[k] for k in keys], dtype=torch.long).to(self.device, non_blocking=True)
        newest, first = self._newest[slots], self._first[slots]  # [B]
        positions = newest[:, None] - (W - 1) + torch.arange(W, device=self.device)[None, :]  # [B, W]
        valid = (positions >= first[:, None]) & (positions >= 0)
        cols = positions.clamp(min=0) % W
        features = self._hidden[slots[:, None], cols] * valid[..., None]
        # x_{t+1}: the next cell's token, and for the newest feature the sequence's newest token.
        following = self._tokens[slots[:, None], (cols + 1) % W]
        following[:, -1] = last_tokens.to(self.device)
        return DraftContext(features=features, next_tokens=torch.where(valid, following, 0),
                            positions=positions.clamp(min=0), lengths=valid.sum(-1))
