"""Lossless verification of draft tokens against the target model's sampling distributions.

One verification step per request, batched over requests whose drafts have different lengths. The
target distribution p_j at draft position j is the one plain sampling would draw from:
``softmax(shape_logits(...))`` with the request's temperature, top-k and top-p (sampler.py).

* Greedy rows (temperature 0): draft token j is accepted iff it is the argmax of p_j; the first
  mismatch is replaced by that argmax.
* Sampled rows, deterministic drafts (no drafter distribution, e.g. a suffix-tree lookup): x_j is
  accepted with probability p_j(x_j); on rejection the replacement is drawn from p_j with x_j
  removed, renormalised.
* Sampled rows with drafter distributions q_j (speculative sampling, Leviathan et al. 2023, Chen
  et al. 2023): x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); on rejection the
  replacement is drawn from max(0, p_j - q_j), renormalised. A deterministic draft is the case
  q_j = one-hot(x_j), and is handled that way.

If every draft of a request is accepted, a bonus token is drawn from the distribution at the
position after its last draft. Either way each request emits accepted_len + 1 tokens whose joint
distribution is exactly that of plain sampling from the target. The log-prob reported for every
emitted token is the one of the target's sampling distribution at its position, as ``sample``
reports it, so importance ratios computed from it do not depend on speculation.

The verification itself keeps every tensor on the device and never reads one back on the host;
``shape_logits`` decides on the host whether any row needs top-k/top-p truncation, unless the
caller says (``truncate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.rollout.sampler import shape_logits


@dataclass
class VerifyResult:
    """Outcome of one verification step for B requests with at most K drafts each.

    accepted_lens [B] long: number of leading draft tokens accepted (0..draft_lens[b]).
    output_tokens [B, K+1] long: the accepted drafts followed by the corrected or bonus token;
        entries after the first accepted_lens[b] + 1 hold ``pad_token_id``.
    output_logprobs [B, K+1] float32: log-prob of each emitted token under the target's sampling
        distribution at its position; 0 after the emitted tokens.
    """

    accepted_lens: torch.Tensor
    output_tokens: torch.Tensor
    output_logprobs: torch.Tensor

    @property
    def num_emitted(self) -> torch.Tensor:
        """[B] number of tokens each request emits (accepted_lens + 1)."""
        return self.accepted_lens + 1


def verify_drafts(target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_lens: torch.Tensor,
                  temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  draft_probs: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  pad_token_id: int = 0, truncate: bool | None = None) -> VerifyResult:
    """Accept or reject each request's draft tokens and emit the corrected or bonus token.

    target_logits [B, K+1, V]: target logits at every draft position and the one after; row j of
        request b is only read for j <= draft_lens[b].
    draft_tokens [B, K] long: draft tokens; entries at j >= draft_lens[b] are ignored (any value).
    draft_lens [B] long in 0..K.
    temperature, top_p, top_k [B]: per-request sampling parameters, as in ``sample``.
    draft_probs [B, K, V] or None: the drafter's distribution q_j each draft token was drawn from
        (probabilities). None means deterministic drafts.
    generator: source of the acceptance draws and of the replacement/bonus draws.
    truncate: whether any row uses top-k/top-p, when the caller knows it (see ``shape_logits``).
    """
    B, K1, V = target_logits.shape
    K = K1 - 1
    if draft_tokens.shape != (B, K):
        raise ValueError(f"draft_tokens has shape {tuple(draft_tokens.shape)}, expected {(B, K)}")
    if draft_lens.shape != (B,):
        raise ValueError(f"draft_lens has shape {tuple(draft_lens.shape)}, expected {(B,)}")
    if draft_probs is not None and draft_probs.shape != (B, K, V):
        raise ValueError(f"draft_probs has shape {tuple(draft_probs.shape)}, expected {(B, K, V)}")
    device = target_logits.device
    rows = torch.arange(B, device=device)
    positions = torch.arange(K1, device=device)

    # Sampling distributions at every position, kept as shaped logits plus their log-normaliser.
    def per_position(x: torch.Tensor) -> torch.Tensor:
        return x[:, None].expand(B, K1).reshape(-1)

    shaped = shape_logits(target_logits.reshape(B * K1, V), per_position(temperature), per_position(top_p),
                          per_position(top_k), truncate).view(B, K1, V)
    log_norm = shaped.logsumexp(-1)  # [B, K+1]
    greedy = temperature <= 0
    target_argmax = shaped.argmax(-1)  # [B, K+1]

    # Acceptance of each draft token.
    valid = positions[None, :K] < draft_lens[:, None]  # [B, K]
    drafts = torch.where(valid, draft_tokens.long().clamp(0, V - 1), 0)
    draft_logp = shaped[:, :K].gather(-1, drafts[..., None]).squeeze(-1) - log_norm[:, :K]  # [B, K]
    if draft_probs is None:
        q_draft = torch.ones(B, K, device=device)
    else:
        q_draft = draft_probs.float().gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, K, device=device, generator=generator)
    # u < p/q without dividing: u in [0, 1), so p >= q always accepts and p == 0 never does.
    sampled_accept = u * q_draft < draft_logp.exp()
    accept = torch.where(greedy[:, None], drafts == target_argmax[:, :K], sampled_accept) & valid
    accepted_lens = accept.long().cumprod(-1).sum(-1)  # [B]

    # The one token drawn at position n = accepted_lens: a replacement if n < draft_lens, else a bonus.
    n = accepted_lens
    logp_n = shaped[rows, n] - log_norm[rows, n, None]  # [B, V]
    p_n = logp_n.exp()
    rejected = n < draft_lens
    n_draft = n.clamp(max=max(K - 1, 0))
    if K == 0:
        q_n = torch.zeros_like(p_n)
    elif draft_probs is None:
        q_n = torch.zeros_like(p_n).scatter_(-1, drafts[rows, n_draft][:, None], 1.0)
    else:
        q_n = draft_probs[rows, n_draft].float()
    residual = torch.where(rejected[:, None], p_n - q_n, p_n).clamp(min=0)
    # Rounding can leave no residual mass where a rejection was still (barely) possible: fall back to p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    noise = torch.empty_like(residual).exponential_(generator=generator)
    # Exponential race: argmax w_i / E_i picks i with probability w_i / sum(w); zero-weight tokens never win.
    race = torch.where(residual > 0, residual.log() - noise.log(), torch.full_like(residual, float("-inf")))
    last_token = torch.where(greedy, target_argmax[rows, n], race.argmax(-1))
    last_logp = logp_n.gather(-1, last_token[:, None]).squeeze(-1)

    # Accepted drafts, then the last token, then padding.
    pos = positions[None, :]
    draft_cols = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)
    draft_logp_cols = torch.cat([draft_logp, draft_logp.new_zeros(B, 1)], dim=1)
    before, at = pos < n[:, None], pos == n[:, None]
    output_tokens = torch.where(before, draft_cols, torch.where(at, last_token[:, None], pad_token_id))
    output_logprobs = torch.where(before, draft_logp_cols, torch.where(at, last_logp[:, None], 0.0))
    return VerifyResult(accepted_lens=accepted_lens, output_tokens=output_tokens,
                        output_logprobs=output_logprobs)
