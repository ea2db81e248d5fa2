"""An EAGLE-style drafter over the target's hidden states, read out through the target's own head.

Alignment (EAGLE, arXiv 2401.15077): the target's feature h_t at position t (the residual stream
computed from token x_t, the state that yields the distribution of x_{t+1}) is paired with the
token x_{t+1} that was actually emitted after it. From the pair the drafter predicts h_{t+1}, whose
read-out through the target's final norm and LM head is the distribution of x_{t+2}:

    x = fc([embed(x_{t+1}) ; feature_norm(h_t)])          2H -> H
    h^_{t+1} = one pre-norm decoder layer (x)             attention over the last `window` rows
    q(x_{t+2}) = softmax(lm_head(final_norm(h^_{t+1})))   the target's frozen embedding, norm, head

Drafting chains: after the last known pair (h_{n-1}, x_n) the drafter predicts h^_n, samples d_1
from q_1, then feeds (h^_n, d_1) to predict h^_{n+1} and d_2, and so on; each row attends to the
earlier rows of its own sequence within the window (true features, then its own predictions).
Training rows are packed: pieces of different sequences share a row but carry distinct segment
ids, and attention never crosses a segment.

The embedding, final norm and LM head are the target's tensors, held by reference (`TargetHead`)
and never trained: weight sync into the target updates them for the drafter too, and the
drafter's `state_dict` holds only its own trainable parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.drafter.config import DrafterConfig
from slipstream.kernels.fused_ops import rope_cos_sin_torch
from slipstream.models.decoder import DecoderConfig, rope_inv_freq
from slipstream.rollout.sampler import shape_logits

__all__ = ["Draft", "DraftContext", "Drafter", "TargetHead", "attention_mask", "context_pairs"]


@dataclass
class TargetHead:
    """The target's token embedding [V, H], final-norm weight [H] and LM head [V, H], by reference."""

    embed: torch.Tensor
    norm_weight: torch.Tensor
    lm_head: torch.Tensor
    eps: float

    @classmethod
    def from_decoder(cls, decoder) -> "TargetHead":
        """From a `slipstream.models.decoder.Decoder` (a tied model reads its embedding as the head)."""
        head = decoder.embed.weight if decoder.lm_head is None else decoder.lm_head.weight
        return cls(decoder.embed.weight, decoder.norm.weight, head, decoder.norm.eps)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual-stream states through the target's final norm: what its head reads."""
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm_weight * x.to(self.norm_weight.dtype)

    def read(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits of states already through the final norm."""
        return F.linear(normed.to(self.lm_head.dtype), self.lm_head).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of residual-stream states, as the target computes them (final norm, then head)."""
        return self.read(self.normed(hidden))


def attention_mask(segment_ids: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L, L] bool: row i attends row j of the same segment with i - window < j <= i.

    segment_ids [B, L] long, -1 for padding. A padding row attends only itself, so no row of the
    attention is empty (an empty softmax row is NaN); padding rows are never attended by others.
    """
    L = segment_ids.shape[1]
    i = torch.arange(L, device=segment_ids.device)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = band[None] & same & (segment_ids >= 0)[:, :, None]
    return mask | torch.eye(L, dtype=torch.bool, device=segment_ids.device)[None]


def context_pairs(features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE pairs of one sequence: features h_a..h_{m-1} [m - a, H] with tokens x_a..x_m [m - a + 1]
    give (h_t, x_{t+1}) for t = a..m-1, i.e. (features, tokens[1:])."""
    if tokens.shape[0] != features.shape[0] + 1:
        raise ValueError(f"a sequence with {features.shape[0]} features needs {features.shape[0] + 1} tokens "
                         f"(the one each feature was computed from, plus the next), got {tokens.shape[0]}")
    return features, tokens[1:]


@dataclass
class DraftContext:
    """The latest known pairs of each request, right-aligned in W columns (W at most the window;
    a longer context is fine, the drafter's attention only reads its own window of it).

    features [B, W, H]: h_t; next_tokens [B, W]: x_{t+1}; positions [B, W]: t; lengths [B]: how many
    of the last columns hold pairs (>= 1). The last column of request b holds (h_{n-1}, x_n), where
    x_n is its newest token (sampled, not yet fed to the target).
    """

    features: torch.Tensor
    next_tokens: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_sequences(cls, sequences: list[tuple[torch.Tensor, torch.Tensor, int]], window: int) -> "DraftContext":
        """From (features h_a..h_{m-1} [m - a, H], tokens x_a..x_m [m - a + 1], a) per request."""
        if not sequences:
            raise ValueError("a draft context needs at least one sequence")
        pairs = []
        for features, tokens, first in sequences:
            if features.shape[0] == 0:
                raise ValueError("every sequence needs at least one feature to draft from")
            h, x = context_pairs(features, tokens)
            keep = min(window, h.shape[0])
            pairs.append((h[-keep:], x[-keep:], first + h.shape[0] - keep))
        W = max(h.shape[0] for h, _, _ in pairs)
        ref = pairs[0][0]
        B, H = len(pairs), ref.shape[1]
        feats = ref.new_zeros(B, W, H)
        toks = torch.zeros(B, W, dtype=torch.long, device=ref.device)
        pos = torch.zeros(B, W, dtype=torch.long, device=ref.device)
        lengths = torch.zeros(B, dtype=torch.long, device=ref.device)
        for b, (h, x, start) in enumerate(pairs):
            n = h.shape[0]
            feats[b, W - n:] = h
            toks[b, W - n:] = x
            pos[b, W - n:] = torch.arange(start, start + n, device=ref.device)
            lengths[b] = n
        return cls(feats, toks, pos, lengths)


@dataclass
class Draft:
    """k drafted tokens per request and the distributions they were drawn from.

    tokens [B, k] long; probs [B, k, V] float32: q_j, the drafter's sampling distribution at step j
    (one-hot at the chosen token for greedy rows), for `verify_drafts(..., draft_probs=probs)`.
    version: the drafter weights that made it (set by `DrafterSlot`; 0 for a bare drafter).
    """

    tokens: torch.Tensor
    probs: torch.Tensor
    version: int = 0

    def expected_accepted(self) -> torch.Tensor:
        """[B, k] the drafter's own estimate of the accepted tokens if the draft is cut to j + 1
        tokens: sum over i <= j of prod_{l <= i} q_l(d_l) (EAGLE-2's confidence as acceptance)."""
        q = self.probs.gather(-1, self.tokens[..., None]).squeeze(-1)
        return q.cumprod(-1).cumsum(-1)


class RMSNorm(nn.Module):
    """RMSNorm in plain PyTorch (the engine's norm may run a fused inference-only kernel; this one trains)."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, D] (the target's halves layout: pairs (i, i + D/2))."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


class DrafterLayer(nn.Module):
    """Pre-norm decoder layer (the target's layer structure: RMSNorm, attention with RoPE, RMSNorm,
    SiLU-gated MLP) with dense attention under a given mask."""

    def __init__(self, c: DecoderConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.qkv_proj = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=False, **kw)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=False, **kw)
        self.post_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False, **kw)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, L, H], cos/sin [B, L, D], mask [B, L, S] over the S = past + L keys.

        Returns (output [B, L, H], (keys, values) [B, S, kv_heads, D]) so a chain can append rows.
        """
        B, L, _ = x.shape
        q, k, v = self.qkv_proj(self.input_norm(x)).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        flat_cos, flat_sin = cos.reshape(B * L, -1), sin.reshape(B * L, -1)
        q = apply_rope(q.reshape(B * L, self.num_heads, self.head_dim), flat_cos, flat_sin)
        k = apply_rope(k.reshape(B * L, self.num_kv_heads, self.head_dim), flat_cos, flat_sin)
        q = q.view(B, L, self.num_heads, self.head_dim)
        k = k.view(B, L, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.num_kv_heads, self.head_dim)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask[:, None], enable_gqa=True)
        x = x + self.o_proj(out.transpose(1, 2).reshape(B, L, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up), (k, v)


class Drafter(nn.Module):
    """See the module docstring. Parameters are float32 by default (they are trained); the target's
    tensors may be of any dtype and device-resident elsewhere only if the drafter runs there too."""

    def __init__(self, target: DecoderConfig, head: TargetHead, config: DrafterConfig | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config = config or DrafterConfig()
        self.target_config = target
        device = torch.device(device) if device is not None else head.embed.device
        kw = dict(dtype=dtype, device=device)
        c = dataclasses.replace(target, num_layers=1,
                                intermediate_size=config.intermediate_size or target.intermediate_size)
        H = target.hidden_size
        # A plain attribute, not a submodule: the head is the target's, frozen and not in state_dict.
        self.head = head
        # The residual stream's scale differs between layers and models; the fc sees it normalised.
        self.feature_norm = RMSNorm(H, target.rms_norm_eps, **kw)
        self.fc = nn.Linear(2 * H, H, bias=False, **kw)
        self.layer = DrafterLayer(c, **kw)
        inv_freq, self.rope_scale = rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def replica(self) -> "Drafter":
        """A new drafter with the same structure, head and current weights (the head is shared)."""
        other = Drafter(self.target_config, self.head, self.config, dtype=self.fc.weight.dtype, device=self.device)
        other.load_state_dict(self.state_dict())
        return other

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin_torch(positions, self.inv_freq, self.rope_scale, self.fc.weight.dtype)

    def _inputs(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.fc.weight.dtype
        h = self.feature_norm(features.to(dtype))
        e = self.head.embed_tokens(next_tokens).to(dtype)
        return self.fc(torch.cat([e, h], dim=-1))

    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
        """Predicted next features [B, L, H] from pairs (h_t [B, L, H], x_{t+1} [B, L]) at positions t
        [B, L], packed by segment_ids [B, L] (-1: padding)."""
        x = self._inputs(features, next_tokens)
        cos, sin = self._rope(positions)
        out, _ = self.layer(x, cos, sin, attention_mask(segment_ids, self.config.window))
        return out

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        return self.head.logits(predicted)

    @torch.no_grad()
    def draft(self, ctx: DraftContext, num_tokens: int, temperature: torch.Tensor,
              top_p: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
              generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Draft:
        """Chain `num_tokens` drafts per request after its context, with the request's sampling
        parameters (temperature [B], 0 = greedy; optional top_p / top_k [B] as in `sample`).
        noise [B, >= num_tokens, V]: Exp(1) draws for the sampling race, drawn here from
        `generator` when None (a CUDA graph of the chain passes its static buffer). No host sync."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        B, W = ctx.next_tokens.shape
        device = ctx.next_tokens.device
        window = self.config.window
        temperature = temperature.to(device=device, dtype=torch.float32)
        truncate = top_p is not None or top_k is not None
        top_p = torch.ones(B, device=device) if top_p is None else top_p.to(device)
        top_k = torch.zeros(B, dtype=torch.long, device=device) if top_k is None else top_k.to(device)
        greedy = temperature <= 0

        valid = torch.arange(W, device=device)[None, :] >= W - ctx.lengths[:, None]
        x = self._inputs(ctx.features, ctx.next_tokens)
        cos, sin = self._rope(ctx.positions)
        out, past = self.layer(x, cos, sin, attention_mask(torch.where(valid, 0, -1), window))
        h, pos, key_valid = out[:, -1], ctx.positions[:, -1], valid

        tokens, probs = [], []
        for j in range(num_tokens):
            shaped = shape_logits(self.head.logits(h), temperature, top_p, top_k, truncate)
            q = shaped.softmax(-1)
            # Exponential race: argmax q_i / E_i draws i with probability q_i.
            race = noise[:, j] if noise is not None else torch.empty_like(q).exponential_(generator=generator)
            tok = torch.where(greedy, shaped.argmax(-1), (q.log() - race.log()).argmax(-1))
            q = torch.where(greedy[:, None], torch.zeros_like(q).scatter_(-1, tok[:, None], 1.0), q)
            tokens.append(tok)
            probs.append(q)
            if j == num_tokens - 1:
                break
            pos = pos + 1
            key_valid = torch.cat([key_valid, key_valid.new_ones(B, 1)], dim=1)
            S = key_valid.shape[1]
            in_window = torch.arange(S, device=device) > S - 1 - window
            x = self._inputs(h[:, None], tok[:, None])
            cos, sin = self._rope(pos[:, None])
            out, past = self.layer(x, cos, sin, (key_valid & in_window)[:, None, :], past=past)
            h = out[:, 0]
        return Draft(torch.stack(tokens, dim=1), torch.stack(probs, dim=1))
