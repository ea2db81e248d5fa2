"""The learned drafter's chain replayed from CUDA graphs, one per (batch bucket, chain length).

A chain of k drafted tokens is a few hundred tiny kernels (the drafter layer, the read-out
through the target's head, the sampling race, k times); launched from Python they cost several
times the verification step they feed. As for the engine's decode steps (`rollout/cuda_graph.py`),
a graph per shape launches them at once. Shapes are fixed per graph: B rows (the decode buckets)
x the full context window W x k tokens, k rounded up to a power of two (at most the drafter's
`max_draft_len`: drawing more tokens than a request's budget is harmless, drafts are cut to it).

Inputs come from static buffers the draft copies its context into: features [B, W, H],
next_tokens and positions [B, W], lengths [B], temperature [B], and the Exp(1) noise of the
sampling race [B, k, V], drawn before the replay from the caller's generator (so a seeded
rollout drafts reproducibly and the graph holds no random state). Padding rows hold one valid
pair of zeros at temperature 1; their drafts are never read. Outputs are static too: the
returned `Draft` is valid until the next draft of this object.

Steps with top-k / top-p rows draft eagerly (as the decode graphs sample eagerly then). On CPU the
same padded static chain runs eagerly (`capture=False`), which is how the tests check the layout.
The graphs bake in the addresses of the drafter's parameters: weights must change in place
(`load_state_dict`, as `DrafterSlot.publish` does).
"""

from __future__ import annotations

import torch

from slipstream.drafter.model import Draft, DraftContext, Drafter
from slipstream.rollout.cuda_graph import capture_graph, default_buckets

__all__ = ["DraftGraphs"]


def chain_lengths(max_draft_len: int) -> list[int]:
    """1, 2, 4, ... below max_draft_len, then max_draft_len."""
    out, k = [], 1
    while k < max_draft_len:
        out.append(k)
        k *= 2
    return out + [max_draft_len]


class DraftGraphs:
    """`draft` as `Drafter.draft`, from graphs over static buffers for up to `max_batch` rows."""

    def __init__(self, drafter: Drafter, max_batch: int, capture: bool = True):
        self.drafter = drafter
        self.device = drafter.device
        self.capture_enabled = capture and self.device.type == "cuda"
        self.buckets = default_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.lengths = chain_lengths(drafter.config.max_draft_len)
        c = drafter.target_config
        B, W, V = self.max_batch, drafter.config.window, c.vocab_size
        kw = dict(device=self.device)
        self.window = W
        self.features = torch.zeros(B, W, c.hidden_size, dtype=torch.float32, **kw)
        self.next_tokens = torch.zeros(B, W, dtype=torch.long, **kw)
        self.positions = torch.zeros(B, W, dtype=torch.long, **kw)
        self.ctx_lengths = torch.ones(B, dtype=torch.long, **kw)
        self.temperature = torch.ones(B, dtype=torch.float32, **kw)
        self.noise = torch.ones(B, self.lengths[-1], V, dtype=torch.float32, **kw)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, Draft | None]] = {}
        self.pool = None

    def shape_for(self, num_rows: int, num_tokens: int) -> tuple[int, int] | None:
        """(B, k) of the graph for a draft, None when none holds it (it runs eagerly)."""
        B = next((b for b in self.buckets if b >= num_rows), None)
        k = next((n for n in self.lengths if n >= num_tokens), None)
        return None if B is None or k is None or num_rows == 0 else (B, k)

    def _chain(self, B: int, k: int) -> Draft:
        ctx = DraftContext(self.features[:B], self.next_tokens[:B], self.positions[:B], self.ctx_lengths[:B])
        return self.drafter.draft(ctx, k, self.temperature[:B], noise=self.noise[:B, :k])

    def _fill(self, ctx: DraftContext, temperature: torch.Tensor, n: int) -> None:
        W = self.window
        self.features[:n].copy_(ctx.features[:, -W:], non_blocking=True)
        self.next_tokens[:n].copy_(ctx.next_tokens[:, -W:], non_blocking=True)
        self.positions[:n].copy_(ctx.positions[:, -W:], non_blocking=True)
        self.ctx_lengths[:n].copy_(ctx.lengths.clamp(max=W), non_blocking=True)
        self.temperature[:n].copy_(temperature, non_blocking=True)
        # padding rows: one valid pair of zeros (an empty attention row would be NaN)
        self.features[n:].zero_()
        self.next_tokens[n:].zero_()
        self.positions[n:].zero_()
        self.ctx_lengths[n:].fill_(1)
        self.temperature[n:].fill_(1.0)

    def draft(self, ctx: DraftContext, num_tokens: int, temperature: torch.Tensor,
              top_p: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> Draft:
        """At least `num_tokens` drafts per request (the chain length rounded up, see the module
        docstring); eagerly when no graph fits, a row truncates, or the context is narrower than
        the window."""
        n = ctx.next_tokens.shape[0]
        shape = self.shape_for(n, num_tokens)
        if shape is None or top_p is not None or top_k is not None or ctx.next_tokens.shape[1] < self.window:
            return self.drafter.draft(ctx, num_tokens, temperature, top_p, top_k, generator)
        B, k = shape
        self._fill(ctx, temperature.to(self.device, torch.float32), n)
        self.noise[:B, :k].exponential_(generator=generator)
        if shape not in self.graphs:
            self._capture(B, k)
        graph, out = self.graphs[shape]
        if graph is None:
            out = self._chain(B, k)
        else:
            graph.replay()
        return Draft(out.tokens[:n], out.probs[:n])

    def _capture(self, B: int, k: int) -> None:
        if not self.capture_enabled:
            self.graphs[B, k] = (None, None)
            return
        graph, out = capture_graph(lambda: self._chain(B, k), self.device, self.pool)
        self.pool = graph.pool()
        self.graphs[B, k] = (graph, out)

    def capture_all(self) -> None:
        """Capture every (bucket, chain length) now, so that no draft of a rollout waits for one."""
        for B in self.buckets:
            for k in self.lengths:
                if (B, k) not in self.graphs:
                    self._capture(B, k)
