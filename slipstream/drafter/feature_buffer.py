"""A bounded ring of recent steps' target features, and aligned training batches drawn from it.

The engine hands every step's `StepFeatures` to the buffer (it is a `feature_sink`). Ingestion
only copies the step's rows into preallocated ring storage (on the device, or page-locked host
memory through asynchronous copies, or plain host memory): no allocation, no host sync, so
rollouts are not slowed. All bookkeeping that needs values on the host (which rows belong to which
sequence at which position) waits until a batch is asked for, i.e. until a bubble.

Eviction: the ring holds at most `buffer_tokens` rows (the oldest steps' rows go first) and no
rows from more than `buffer_max_age` RL steps before the current one (`set_step`).

Alignment is done in one place, `aligned_pairs`: rows of one sequence at consecutive positions
t, t+1 give the pair (h_t, x_{t+1}) with target h_{t+1}. A gap in positions (a prefix cached by a
sibling, a chunk evicted) splits a sequence into runs, and pairs never span runs or sequences.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

from slipstream.drafter.config import DrafterConfig
from slipstream.rollout.model_runner import StepFeatures

__all__ = ["DrafterBatch", "FeatureBuffer", "aligned_pairs"]


@dataclass
class DrafterBatch:
    """Packed training rows: B rows of L columns, pieces of sequences separated by segment ids.

    features [B, L, H]: h_t; next_tokens [B, L]: x_{t+1}; target_features [B, L, H]: h_{t+1};
    positions [B, L]: t; segment_ids [B, L]: piece id within the row, -1 for padding;
    data_steps [B, L]: the RL step whose rollout produced the row (-1 for padding).
    newest_step, mean_step: of the rows' RL steps, known on the host without a sync.
    """

    features: torch.Tensor
    next_tokens: torch.Tensor
    target_features: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor
    data_steps: torch.Tensor
    newest_step: int
    mean_step: float

    @property
    def valid(self) -> torch.Tensor:
        return self.segment_ids >= 0


def aligned_pairs(rows: torch.Tensor, tokens: torch.Tensor, run_ids: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EAGLE training pairs from rows sorted by (run, position), each run at consecutive positions.

    rows, tokens, run_ids [N]: storage row, token id and run of each position. Returns, for every
    t whose successor t+1 is in the same run: (feature row of h_t, token x_{t+1}, target row of
    h_{t+1}, run id).
    """
    same = run_ids[1:] == run_ids[:-1]
    return rows[:-1][same], tokens[1:][same], rows[1:][same], run_ids[:-1][same]


@dataclass
class _Chunk:
    start: int  # first ring row
    length: int
    step: int  # RL step (policy version) whose rollout produced it
    seq_keys: list
    ready: torch.cuda.Event | None  # set when copies into host memory were asynchronous


@dataclass
class _Pairs:
    feature_rows: torch.Tensor  # [P] ring rows of h_t
    next_tokens: torch.Tensor  # [P]
    target_rows: torch.Tensor  # [P] ring rows of h_{t+1}
    positions: torch.Tensor  # [P] t
    steps: torch.Tensor  # [P] RL step of the pair's data
    run_end: list[int]  # [P] index one past the last pair of the pair's run (host list: read per piece)


class FeatureBuffer:
    """The engine's feature sink for the drafter; see the module docstring.

    hidden_size, dtype: of the captured layer's rows. device: where the target runs (the storage
    device for `buffer_storage="device"`). The captured layer is `config.capture_layer`: the
    engine must be built with it among its `capture_layers`.
    """

    def __init__(self, config: DrafterConfig, hidden_size: int, dtype: torch.dtype = torch.float32, device=None):
        self.config = config
        self.layer = config.capture_layer
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        storage = config.buffer_storage
        if storage == "pinned" and not torch.cuda.is_available():
            raise ValueError("drafter.buffer_storage=pinned needs CUDA (page-locked memory for asynchronous "
                             "device-to-host copies); use cpu or device")
        store_on = self.device if storage == "device" else torch.device("cpu")
        pin = storage == "pinned"
        cap = self.capacity = config.buffer_tokens
        self._hidden = torch.empty(cap, hidden_size, dtype=dtype, device=store_on, pin_memory=pin)
        self._tokens = torch.empty(cap, dtype=torch.long, device=store_on, pin_memory=pin)
        self._positions = torch.empty(cap, dtype=torch.long, device=store_on, pin_memory=pin)
        self._owner = torch.empty(cap, dtype=torch.long, device=store_on, pin_memory=pin)
        self._chunks: deque[_Chunk] = deque()
        self._dirty = False  # rows arrived since the index was built
        self._head = 0  # next ring row to write
        self._used = 0
        self.step = 0
        self._pairs: _Pairs | None = None
        # Rows written since the index was built, and the free rows then: while the first stays
        # within the second, no indexed row has been overwritten and the index may be reused.
        self._written_since, self._free_at_index = 0, 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- ingestion (decode loop)

    def __call__(self, features: StepFeatures) -> None:
        hidden = features.hidden.get(self.layer)
        if hidden is None:
            raise KeyError(f"the drafter reads capture layer {self.layer}, the engine captured "
                           f"{sorted(features.hidden)}: build the Engine with capture_layers including {self.layer}")
        T = hidden.shape[0]
        if T == 0:
            return
        cols = [hidden, features.token_ids, features.positions, features.owner]
        if T > self.capacity:  # one step larger than the whole ring: keep its latest rows
            cols = [c[T - self.capacity:] for c in cols]
            T = self.capacity
        with self._lock:
            while self._used + T > self.capacity:
                self._used -= self._chunks.popleft().length
            start = self._head
            first = min(T, self.capacity - start)
            asynchronous = self.config.buffer_storage == "pinned" and hidden.is_cuda
            for dst, src in zip((self._hidden, self._tokens, self._positions, self._owner), cols):
                dst[start:start + first].copy_(src[:first], non_blocking=asynchronous)
                if first < T:
                    dst[:T - first].copy_(src[first:], non_blocking=asynchronous)
            ready = None
            if asynchronous:
                ready = torch.cuda.Event()
                ready.record()
            self._chunks.append(_Chunk(start, T, self.step, list(features.seq_keys), ready))
            self._head = (start + T) % self.capacity
            self._used += T
            self._written_since += T
            self._dirty = True

    def set_step(self, step: int) -> None:
        """The RL step whose rollout the next features come from; drops rows older than the age limit."""
        with self._lock:
            self.step = step
            while self._chunks and self._chunks[0].step < step - self.config.buffer_max_age:
                self._used -= self._chunks.popleft().length
                self._pairs = None  # the index holds pairs that must not be trained on any more

    def __len__(self) -> int:
        """Rows held."""
        return self._used

    # ---------------------------------------------------------------- training batches (bubbles)

    def _index(self, refresh: bool = True) -> _Pairs:
        reusable = self._pairs is not None and self._written_since <= self._free_at_index
        if reusable and (not self._dirty or not refresh):
            return self._pairs
        self._dirty = False
        self._written_since, self._free_at_index = 0, self.capacity - self._used
        if not self._chunks:
            empty = torch.zeros(0, dtype=torch.long)
            self._pairs = _Pairs(empty, empty, empty, empty, empty, [])
            return self._pairs
        # Every chunk's sequences get global ids; a row's id is its chunk's table at its owner.
        seq_ids: dict[tuple, int] = {}
        tables, offsets, lengths, steps = [], [], [], []
        for c in self._chunks:
            if c.ready is not None:
                c.ready.synchronize()
            offsets.append(sum(len(t) for t in tables))
            tables.append([seq_ids.setdefault((c.step, *k), len(seq_ids)) for k in c.seq_keys])
            lengths.append(c.length)
            steps.append(c.step)
        lengths_t = torch.tensor(lengths)
        starts = torch.tensor([c.start for c in self._chunks])
        chunk_of_row = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
        chunk_start = torch.repeat_interleave(lengths_t.cumsum(0) - lengths_t, lengths_t)
        within = torch.arange(int(lengths_t.sum())) - chunk_start
        rows = (starts[chunk_of_row] + within) % self.capacity
        # One gather and one device-to-host copy per column, whatever the number of chunks.
        where = rows.to(self._owner.device)
        owner, positions, tokens = (x[where].cpu() for x in (self._owner, self._positions, self._tokens))
        seqs = torch.tensor([i for t in tables for i in t], dtype=torch.long)[
            torch.tensor(offsets)[chunk_of_row] + owner]
        steps = torch.tensor(steps)[chunk_of_row]
        # Sort by (sequence, position); a position seen twice (recomputed after preemption) keeps
        # its newest row, which the stable sort puts last.
        key = seqs * (int(positions.max()) + 2) + positions
        order = torch.sort(key, stable=True).indices
        key, rows, seqs, steps, positions, tokens = (x[order] for x in (key, rows, seqs, steps, positions, tokens))
        keep = torch.ones_like(key, dtype=torch.bool)
        keep[:-1] = key[1:] != key[:-1]
        rows, seqs, steps, positions, tokens = (x[keep] for x in (rows, seqs, steps, positions, tokens))
        # A run: consecutive positions of one sequence.
        breaks = torch.ones_like(seqs, dtype=torch.bool)
        breaks[1:] = (seqs[1:] != seqs[:-1]) | (positions[1:] != positions[:-1] + 1)
        run_ids = breaks.long().cumsum(0)
        by_row = torch.full((self.capacity,), -1, dtype=torch.long)
        by_row[rows] = torch.arange(rows.shape[0])
        feat_rows, next_tokens, target_rows, pair_runs = aligned_pairs(rows, tokens, run_ids)
        src = by_row[feat_rows]
        P = feat_rows.shape[0]
        run_end = torch.zeros(0, dtype=torch.long)
        if P:
            last = torch.ones(P, dtype=torch.bool)
            last[:-1] = pair_runs[1:] != pair_runs[:-1]
            ends = torch.nonzero(last).squeeze(-1) + 1
            run_end = torch.repeat_interleave(ends, torch.diff(ends, prepend=ends.new_zeros(1)))
        self._pairs = _Pairs(feat_rows, next_tokens, target_rows, positions[src], steps[src], run_end.tolist())
        return self._pairs

    def num_pairs(self) -> int:
        """Training pairs (h_t, x_{t+1}) -> h_{t+1} the buffer holds."""
        with self._lock:
            return int(self._index().feature_rows.shape[0])

    def sample(self, generator: torch.Generator | None = None, device=None, refresh: bool = True,
               step: int | None = None) -> DrafterBatch | None:
        """A batch of about `batch_tokens` pairs in rows of `seq_len`, on `device` (default: the
        buffer's device); None while the buffer holds no pair. Pieces start at uniformly drawn
        pairs and run to the end of their run or of the row. `step`: only pairs of that RL
        step's rollout (None if it has none).

        refresh=False samples from the pairs indexed before, without reading the newest steps'
        rows (which costs host syncs), as long as none of the indexed rows has been overwritten:
        for training while the engine is still writing (the side stream)."""
        device = torch.device(device) if device is not None else self.device
        L = self.config.seq_len
        B = max(1, -(-self.config.batch_tokens // L))
        with self._lock:
            pairs = self._index(refresh)
            P = pairs.feature_rows.shape[0]
            if P == 0:
                return None
            index = torch.full((B, L), -1, dtype=torch.long)
            segments = torch.full((B, L), -1, dtype=torch.long)
            if step is None:
                starts = torch.randint(P, (B * L,), generator=generator).tolist()
            else:  # a run is one sequence of one rollout: pieces from these starts stay in the step
                of_step = torch.nonzero(pairs.steps == step).squeeze(-1)
                if of_step.numel() == 0:
                    return None
                starts = of_step[torch.randint(of_step.numel(), (B * L,), generator=generator)].tolist()
            run_end = pairs.run_end
            draws = iter(starts)
            for b in range(B):
                col, seg = 0, 0
                while col < L:
                    i = next(draws)
                    n = min(run_end[i] - i, L - col)
                    index[b, col:col + n] = torch.arange(i, i + n)
                    segments[b, col:col + n] = seg
                    col, seg = col + n, seg + 1
            valid = index >= 0
            safe = index.clamp(min=0)
            row_steps = pairs.steps[safe][valid]
            # The host-made columns go over in one page-locked, asynchronous copy: the host does
            # not wait for the device (which may be busy decoding).
            cols = torch.stack([pairs.feature_rows[safe], pairs.target_rows[safe],
                                torch.where(valid, pairs.next_tokens[safe], 0),
                                torch.where(valid, pairs.positions[safe], 0), segments,
                                torch.where(valid, pairs.steps[safe], -1)])
            to_storage = _to(cols[:2], self._hidden.device)
            cols = _to(cols[2:], device)
            return DrafterBatch(
                features=self._hidden[to_storage[0]].to(device),
                next_tokens=cols[0],
                target_features=self._hidden[to_storage[1]].to(device),
                positions=cols[1],
                segment_ids=cols[2],
                data_steps=cols[3],
                newest_step=int(row_steps.max()),
                mean_step=float(row_steps.float().mean()),
            )


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
