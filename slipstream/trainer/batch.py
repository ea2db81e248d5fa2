"""The training batch built from rollout completions.

Layout: every row is [left padding | prompt | response | right padding], with all prompts
left-padded to the same width P so that response token j of every row sits at column P + j.
The logits that predict the response are then the last R + 1 positions, for all rows at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slipstream.rollout.types import Completion


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, P + R] long
    attention_mask: torch.Tensor  # [B, P + R] long
    position_ids: torch.Tensor  # [B, P + R] long
    response_mask: torch.Tensor  # [B, R] float, 1 on response tokens
    rollout_logprobs: torch.Tensor  # [B, R] float, 0 on padding
    rewards: torch.Tensor  # [B] float
    group_ids: torch.Tensor  # [B] long
    prompt_width: int

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def _map(self, fn) -> "RolloutBatch":
        """`fn` applied to every per-row tensor."""
        return RolloutBatch(*(fn(t) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                              self.response_mask, self.rollout_logprobs, self.rewards,
                                              self.group_ids)), prompt_width=self.prompt_width)

    def rows(self, start: int, end: int) -> "RolloutBatch":
        return self._map(lambda t: t[start:end])

    def select(self, index: torch.Tensor) -> "RolloutBatch":
        """The rows at `index`, in that order."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> "RolloutBatch":
        return self._map(lambda t: t.to(device))

    def trimmed(self, width: int) -> "RolloutBatch":
        """The batch cut to `width` response columns (the right padding past its rows' longest response)."""
        P = self.prompt_width
        return dataclasses.replace(
            self, input_ids=self.input_ids[:, : P + width], attention_mask=self.attention_mask[:, : P + width],
            position_ids=self.position_ids[:, : P + width], response_mask=self.response_mask[:, :width],
            rollout_logprobs=self.rollout_logprobs[:, :width])


@dataclass(frozen=True)
class MicroBatching:
    """How a mini-batch is cut into micro-batches. `rows` sequences each (trainer.micro_batch_size);
    or, with `tokens` > 0 (trainer.micro_batch_tokens), as many rows of similar length as fit in
    that many tokens (rows x padded length): short answers then share one forward and backward
    in larger numbers, which launches fewer kernels for the same work. `agree`: the number of
    micro-batches every rank runs, from this rank's own (a sharded backend's forward passes run
    collectives, so every rank must run as many); None for one process."""

    rows: int
    tokens: int = 0
    agree: Callable[[int], int] | None = None


def _token_groups(widths: list[int], prompt_width: int, budget: int) -> list[tuple[int, int]]:
    """[start, end) ranges over rows sorted by response width, each holding as many rows as fit
    in `budget` tokens at its longest row's padded length (a row longer than that alone)."""
    groups, start = [], 0
    for i, w in enumerate(widths):
        if i > start and (i - start + 1) * (prompt_width + w) > budget:
            groups.append((start, i))
            start = i
    if widths:
        groups.append((start, len(widths)))
    return groups


def _split_to(groups: list[tuple[int, int]], widths: list[int], prompt_width: int, count: int) -> list[tuple[int, int]]:
    """`groups` split until there are `count`: the costliest group of 2 or more rows in halves each time."""
    groups = list(groups)
    while len(groups) < count:
        splittable = [g for g in groups if g[1] - g[0] > 1]
        if not splittable:
            raise ValueError(f"{len(widths)} rows cannot form {count} micro-batches")
        s, e = max(splittable, key=lambda g: (g[1] - g[0]) * (prompt_width + widths[g[1] - 1]))
        i = groups.index((s, e))
        mid = (s + e) // 2
        groups[i : i + 1] = [(s, mid), (mid, e)]
    return groups


@dataclass
class MicroBatch:
    rows: torch.Tensor  # [n] indices of these rows in the batch they came from, on the device
    batch: RolloutBatch  # those rows, on the device, cut to `width` response columns
    width: int


def length_grouped(batch: RolloutBatch, cut: MicroBatching, device: torch.device) -> list[MicroBatch]:
    """`batch` in micro-batches (`cut`) of rows of similar response length, each cut to its
    longest response: the padding past it would cost forward and backward compute for nothing.
    The batch is copied to the device once (a pageable copy per micro-batch would wait for the
    GPU each time)."""
    lengths = batch.response_mask.sum(-1).long()
    order = torch.argsort(lengths, stable=True)
    widths = [max(1, w) for w in lengths[order].tolist()]
    if cut.tokens > 0:
        groups = _token_groups(widths, batch.prompt_width, cut.tokens)
    else:
        groups = [(s, min(s + cut.rows, batch.size)) for s in range(0, batch.size, cut.rows)]
    if cut.agree is not None:
        groups = _split_to(groups, widths, batch.prompt_width, cut.agree(len(groups)))
    rows = batch.select(order).to(device)
    order = order.to(device)
    return [MicroBatch(order[s:e], rows.rows(s, e).trimmed(widths[e - 1]), widths[e - 1]) for s, e in groups]


def per_response_token(batch: RolloutBatch, cut: MicroBatching, device: torch.device, fn) -> torch.Tensor:
    """[B, R] on `device`: `fn(micro-batch)` ([n, width], 0 on padding) of every length-grouped
    micro-batch, put back at its rows; 0 past each micro-batch's width."""
    out = torch.zeros(batch.size, batch.response_width, device=device)
    for micro in length_grouped(batch, cut, device):
        out[micro.rows, : micro.width] = fn(micro.batch)
    return out


def build_batch(completions: list[Completion], rewards: list[float], pad_id: int) -> RolloutBatch:
    group_index: dict[str, int] = {}
    gids = [group_index.setdefault(c.group_id, len(group_index)) for c in completions]
    P = max(len(c.prompt_ids) for c in completions)
    R = max(1, max(len(c.tokens) for c in completions))
    B = len(completions)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp_mask = torch.zeros((B, R))
    rollout_lp = torch.zeros((B, R))
    for i, c in enumerate(completions):
        p, r = len(c.prompt_ids), len(c.tokens)
        input_ids[i, P - p : P] = torch.tensor(c.prompt_ids)
        attn[i, P - p : P + r] = 1
        if r:
            input_ids[i, P : P + r] = torch.tensor(c.tokens)
            resp_mask[i, :r] = 1
            rollout_lp[i, :r] = torch.tensor(c.logprobs)
    # Positions count real tokens only, as generation does for left-padded prompts.
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=position_ids,
        response_mask=resp_mask,
        rollout_logprobs=rollout_lp,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(gids, dtype=torch.long),
        prompt_width=P,
    )
