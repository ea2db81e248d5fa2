"""Batched sampling with per-row temperature, top-k and top-p, and the log-prob of each draw.

The log-prob returned is the one of the distribution the token was drawn from: logits divided by
the temperature, truncated to the top-k tokens and to the smallest set whose mass reaches top-p,
renormalised. Greedy rows (temperature 0) take the argmax and report the log-softmax of the raw
logits. Everything stays on the device: no host synchronisation.
"""

from __future__ import annotations

import torch

from slipstream.kernels.fused_ops import use_triton as _fused_ok


def shape_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 top_k: torch.Tensor, truncate: bool | None = None) -> torch.Tensor:
    """[N, V] logits of the sampling distribution (-inf outside the kept set).

    temperature [N] (0 = greedy: left unscaled), top_p [N] in (0, 1], top_k [N] (<= 0: off); top_p and
    top_k may be None with `truncate=False`.
    `truncate`: whether any row uses top-k/top-p, when the caller knows it (the engine does, from
    the requests' params); None reads it from the tensors, which costs a host sync on GPU.
    """
    logits = logits.float()
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    logits = logits / t[:, None]
    if truncate is None:
        truncate = bool((top_k > 0).any()) or bool((top_p < 1.0).any())
    if truncate:
        need_k, need_p = top_k > 0, top_p < 1.0
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop = need_k[:, None] & (rank >= top_k[:, None])
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Drop a token once the mass before it reaches top_p; the top token always stays.
        drop |= need_p[:, None] & ((probs.cumsum(-1) - probs) >= top_p[:, None])
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           generator: torch.Generator | None = None, truncate: bool | None = None,
           seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns (tokens [N] long, logprobs [N] float32).

    With `seed` and `truncate=False`, GPU rows go through one fused kernel (`kernels.sampling`),
    whose randomness comes from `seed` instead of `generator`.
    """
    if seed is not None and truncate is False and _fused_ok(logits):
        from slipstream.kernels.sampling import fused_sample

        return fused_sample(logits, temperature, seed)
    shaped = shape_logits(logits, temperature, top_p, top_k, truncate)
    top = shaped.amax(-1, keepdim=True)
    weights = (shaped - top).exp_()
    uniform = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device, dtype=torch.float64)
    drawn = inverse_cdf(weights, uniform)
    tokens = torch.where(temperature > 0, drawn, shaped.argmax(-1))
    log_norm = top.squeeze(-1) + weights.sum(-1).log()  # the log-softmax's normaliser
    return tokens, shaped.gather(-1, tokens[:, None]).squeeze(-1) - log_norm


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """[N] indices, row n's drawn with probability weights[n, i] / sum(weights[n]) when uniform[n]
    ([N, 1] float64) is uniform in [0, 1): the first whose running sum reaches (1 - u) x the total.

    One uniform per row against the running sum: an exponential per vocabulary entry (the race
    argmax p_i / E_i) cost 6x as much on CPU. The sum runs in float64: in float32 a tail entry
    below half a unit in the last place of the sum before it would get no interval at all, and tens
    of thousands of such entries can hold 1e-4 of the mass. 1 - u is in (0, 1], so the sum reached
    is in (0, total] and the entry found has a positive weight.
    """
    cdf = weights.double().cumsum_(-1)
    return torch.searchsorted(cdf, (1.0 - uniform) * cdf[:, -1:]).squeeze(-1)
