"""RL algorithm pieces as pure functions on tensors, looked up by name from registries.

`AlgorithmConfig` names one entry of each registry:

* ``ADVANTAGE_ESTIMATORS`` (``algorithm.advantage``): one scalar advantage per sequence,
  computed from the sequence rewards and the id of the prompt group each sequence belongs to.
  ``fn(rewards[B], group_ids[B], *, norm_by_std=True, eps=1e-6) -> advantages[B]``.
* ``POLICY_LOSSES`` (``algorithm.policy_loss``): a per-token loss and a few detached metrics.
  ``fn(logprobs[B,T], old_logprobs[B,T], advantages[B], mask[B,T], *, clip_low, clip_high,
  is_weights=None) -> (token_loss[B,T], metrics)``.
  ``advantages`` is one value per sequence [B] or one per token [B,T] (PPO's GAE).
* ``LOSS_AGGREGATIONS`` (``algorithm.loss_agg``): reduces a micro-batch's per-token loss to a
  scalar. ``fn(token_loss[B,T], mask[B,T], *, num_seqs, num_tokens, max_tokens) -> scalar``,
  where ``num_seqs`` and ``num_tokens`` count the whole optimisation batch (every micro-batch),
  so that the micro-batch losses add up to exactly the full-batch loss.

Conventions: ``mask`` is 1 (or True) on response tokens that take part in the loss and 0 on
prompt and padding positions; log-probabilities at masked-out positions should be finite (fill
padding with 0), since a NaN there would reach the gradient through the multiplications.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., Tensor]] = {}
# Advantages that need a critic (per-token values) rather than rewards alone: PPO's GAE.
CRITIC_ADVANTAGES = ("gae",)

# Log-ratios are clamped to this range before exp() so that a far-off token cannot overflow to
# inf (exp(20) ~ 4.9e8 is already far beyond any clip or cap in use).
_MAX_LOG_RATIO = 20.0


def _register(registry: dict, kind: str, name: str):
    def decorator(fn):
        if name in registry and registry[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered")
        registry[name] = fn
        return fn

    return decorator


def register_advantage(name: str):
    """Decorator: add an advantage estimator to ADVANTAGE_ESTIMATORS under `name`."""
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str):
    """Decorator: add a policy loss to POLICY_LOSSES under `name`."""
    return _register(POLICY_LOSSES, "policy loss", name)


def register_loss_agg(name: str):
    """Decorator: add a loss aggregation to LOSS_AGGREGATIONS under `name`."""
    return _register(LOSS_AGGREGATIONS, "loss aggregation", name)


# ---------------------------------------------------------------------------------------------
# helpers


def _as_float(x: Tensor) -> Tensor:
    """float32 unless already float64 (half-precision log-probs lose too much in exp())."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


class _Groups:
    """Per-group statistics of a 1-D value vector, computed with scatter operations."""

    def __init__(self, values: Tensor, group_ids: Tensor):
        if values.dim() != 1 or group_ids.shape != values.shape:
            raise ValueError(
                f"rewards and group_ids must be 1-D of the same length, got "
                f"{tuple(values.shape)} and {tuple(group_ids.shape)}"
            )
        # Group ids may be any integers (not necessarily 0..G-1, not necessarily contiguous).
        unique_ids, self.index = torch.unique(group_ids, return_inverse=True)
        num_groups = unique_ids.numel()
        zeros = values.new_zeros(num_groups)
        self.count = zeros.index_add(0, self.index, torch.ones_like(values))
        self.sum = zeros.index_add(0, self.index, values)
        self.mean = self.sum / self.count.clamp(min=1.0)
        gmin = zeros.scatter_reduce(0, self.index, values, reduce="amin", include_self=False)
        gmax = zeros.scatter_reduce(0, self.index, values, reduce="amax", include_self=False)
        # Per sample: its group has no signal (a single sample, or every reward equal).
        self.degenerate = ((self.count < 2) | (gmin == gmax))[self.index]

    def per_sample(self, group_stat: Tensor) -> Tensor:
        return group_stat[self.index]


# ---------------------------------------------------------------------------------------------
# advantage estimators


@register_advantage("grpo")
def grpo_advantage(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = True,
                   eps: float = 1e-6) -> Tensor:
    """GRPO: reward minus its group mean, divided by the group std when `norm_by_std`.

    With ``norm_by_std=False`` this is Dr.GRPO's unnormalised advantage. The std is the
    unbiased (Bessel-corrected, n-1) sample std, as torch.std computes by default. Groups of
    one sample and groups whose rewards are all equal get an advantage of exactly 0.
    """
    r = _as_float(rewards)
    g = _Groups(r, group_ids)
    centred = r - g.per_sample(g.mean)
    if norm_by_std:
        sq = r.new_zeros(g.count.shape).index_add(0, g.index, centred * centred)
        std = (sq / (g.count - 1.0).clamp(min=1.0)).sqrt()
        centred = centred / (g.per_sample(std) + eps)
    return torch.where(g.degenerate, torch.zeros_like(centred), centred)


@register_advantage("rloo")
def rloo_advantage(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = True,
                   eps: float = 1e-6) -> Tensor:
    """RLOO: reward minus the mean reward of the other samples of its group.

    `norm_by_std` and `eps` are accepted for a common signature and ignored: the
    leave-one-out baseline is used unnormalised. Groups of one sample (no other sample to
    form a baseline) and groups whose rewards are all equal get exactly 0.
    """
    del norm_by_std, eps
    r = _as_float(rewards)
    g = _Groups(r, group_ids)
    n = g.per_sample(g.count)
    baseline = (g.per_sample(g.sum) - r) / (n - 1.0).clamp(min=1.0)
    adv = r - baseline
    return torch.where(g.degenerate, torch.zeros_like(adv), adv)


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = True,
                           eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (arXiv 2501.03262): the return normalised over the whole batch, not per group.

    With an outcome reward and gamma = 1 every token's return is the sequence reward, so the
    per-sequence advantage is (r - mean(r)) / std(r) over all sequences given. Under SPMD the
    caller passes the rewards of every rank (see `trainer.distributed.global_advantages`), so
    the statistics are those of the global batch. `group_ids` is unused; `norm_by_std=False`
    keeps the centring only.
    """
    del group_ids
    r = _as_float(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got {tuple(r.shape)}")
    centred = r - r.mean()
    if norm_by_std and r.numel() > 1:
        centred = centred / (r.std() + eps)
    return centred


# ---------------------------------------------------------------------------------------------
# PPO with a critic: generalised advantage estimation and the clipped value loss


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards [B,T]: each sequence's reward on its last response token, 0 elsewhere.

    A sequence without response tokens gets no reward (it has no action to credit).
    """
    if rewards.dim() != 1 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"rewards must have shape ({mask.shape[0]},), got {tuple(rewards.shape)}")
    m = mask.to(torch.float32)
    lengths = m.sum(-1).long()
    out = torch.zeros_like(m)
    has = lengths > 0
    rows = torch.arange(m.shape[0], device=m.device)[has]
    out[rows, lengths[has] - 1] = _as_float(rewards)[has].to(out.dtype)
    return out


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where V_{t+1}
    and A_{t+1} are 0 past a sequence's last token (the episode ends there). Returns
    (advantages, returns = advantages + values), both [B,T], 0 on masked-out positions.
    """
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    r, v, m = _as_float(token_rewards), _as_float(values).detach(), mask.to(torch.float32)
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_adv = r.new_zeros(r.shape[0])
    next_value = r.new_zeros(r.shape[0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = v[:, t] * m[:, t]
    returns = (adv + v) * m
    return adv, returns


def masked_whiten(x: Tensor, mask: Tensor, *, eps: float = 1e-8,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x - mean) / std over masked-in entries, 0 elsewhere (PPO's advantage normalisation).

    `reduce` sums a tensor over every process holding part of the batch (identity by default),
    so that the mean and variance are those of the global batch.
    """
    reduce = reduce or (lambda t: t)
    xf, m = _as_float(x), mask.to(torch.float32)
    sums = reduce(torch.stack([(xf * m).sum(), m.sum()]))
    mean = sums[0] / sums[1].clamp(min=1.0)
    sq = reduce(((xf - mean) ** 2 * m).sum().reshape(1))[0]
    var = sq / sums[1].clamp(min=1.0)
    return (xf - mean) * torch.rsqrt(var + eps) * m


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                       clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's value loss with value clipping, per token.

    loss = 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, -clip, clip):
    the new value gets no credit for moving further than `clip` from the one the returns were
    computed with. `clip <= 0` turns clipping off (plain 0.5 * (V - R)^2).
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
                         f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must have the same shape")
    v, old, ret = _as_float(values), _as_float(old_values).detach(), _as_float(returns).detach()
    unclipped = (v - ret) ** 2
    if clip <= 0:
        loss = 0.5 * unclipped
        clipped_frac = v.new_zeros(())
    else:
        v_clipped = old + (v - old).clamp(-clip, clip)
        clipped = (v_clipped - ret) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clipped_frac = _masked_mean((clipped > unclipped).to(v.dtype), mask)
    with torch.no_grad():
        metrics = {"critic/vf_clip_frac": clipped_frac, "critic/value_mean": _masked_mean(v, mask),
                   "critic/return_mean": _masked_mean(ret, mask)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# KL estimators (per token). Both estimate KL(pi || pi_ref) from tokens sampled from pi, where
# `logprobs` are pi's log-probabilities of those tokens and `ref_logprobs` pi_ref's.


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref: unbiased, but each sample can be negative (high variance)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 = exp(ref - lp) - (ref - lp) - 1: unbiased, and >= 0 for every token.

    The log-ratio is clamped to +-20 before exp() to keep the value finite.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1.0


# ---------------------------------------------------------------------------------------------
# loss aggregations


def _masked(token_loss: Tensor, mask: Tensor) -> Tensor:
    if token_loss.shape != mask.shape:
        raise ValueError(f"token_loss {tuple(token_loss.shape)} and mask {tuple(mask.shape)} differ in shape")
    return torch.where(mask.bool(), token_loss, torch.zeros_like(token_loss))


@register_loss_agg("token-mean")
def agg_token_mean(token_loss: Tensor, mask: Tensor, *, num_seqs: int, num_tokens: int,
                   max_tokens: int) -> Tensor:
    """DAPO: every token of the batch weighs the same: sum / num_tokens (batch total)."""
    del num_seqs, max_tokens
    return _masked(token_loss, mask).sum() / max(num_tokens, 1)


@register_loss_agg("seq-mean-token-mean")
def agg_seq_mean_token_mean(token_loss: Tensor, mask: Tensor, *, num_seqs: int, num_tokens: int,
                            max_tokens: int) -> Tensor:
    """Original GRPO: mean over each sequence's tokens, then mean over sequences (batch total).

    A sequence without any masked-in token contributes 0 but still counts in `num_seqs`.
    """
    del num_tokens, max_tokens
    per_seq_sum = _masked(token_loss, mask).sum(dim=-1)
    per_seq_len = mask.to(per_seq_sum.dtype).sum(dim=-1).clamp(min=1.0)
    return (per_seq_sum / per_seq_len).sum() / max(num_seqs, 1)


@register_loss_agg("seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(token_loss: Tensor, mask: Tensor, *, num_seqs: int, num_tokens: int,
                                max_tokens: int) -> Tensor:
    """Dr.GRPO: token sum divided by a constant, num_seqs * max_tokens (no length bias)."""
    del num_tokens
    return _masked(token_loss, mask).sum() / max(num_seqs * max_tokens, 1)


# ---------------------------------------------------------------------------------------------
# policy losses


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    if logprobs.shape != old_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} differ in shape")
    diff = _as_float(logprobs) - _as_float(old_logprobs).detach()
    return diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Per-sequence advantages [B] broadcast over tokens, or per-token ones [B,T] as they are."""
    if advantages.shape == like.shape:
        return advantages.detach().to(like.dtype)
    if advantages.dim() != 1 or advantages.shape[0] != like.shape[0]:
        raise ValueError(f"advantages must have shape ({like.shape[0]},) or {tuple(like.shape)}, "
                         f"got {tuple(advantages.shape)}")
    return advantages.detach().to(like.dtype).unsqueeze(-1)


def _apply_is_weights(token_loss: Tensor, is_weights: Tensor | None) -> Tensor:
    if is_weights is None:
        return token_loss
    return token_loss * is_weights.detach().to(token_loss.dtype)


@register_policy_loss("clipped")
def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_low: float = 0.2, clip_high: float = 0.2,
                        is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate with asymmetric bounds [1 - clip_low, 1 + clip_high].

    loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(lp - old),
    times the detached truncated-IS weights when given. A token is "clipped" when the clipped
    term is the one selected, i.e. its gradient is zero (A > 0 and ratio > 1 + clip_high, or
    A < 0 and ratio < 1 - clip_low).
    """
    log_ratio = _log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_ratio)
    adv = _token_advantages(advantages, ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(loss_unclipped, loss_clipped)
    token_loss = _apply_is_weights(token_loss, is_weights)

    with torch.no_grad():
        clipped = loss_clipped > loss_unclipped
        high = clipped & (ratio > 1.0 + clip_high)
        low = clipped & (ratio < 1.0 - clip_low)
        metrics = {
            "policy/clip_frac": _masked_mean(clipped.to(ratio.dtype), mask),
            "policy/clip_frac_high": _masked_mean(high.to(ratio.dtype), mask),
            "policy/clip_frac_low": _masked_mean(low.to(ratio.dtype), mask),
            "policy/ratio_mean": _masked_mean(ratio, mask),
        }
    return token_loss, metrics


@register_policy_loss("vanilla_pg")
def vanilla_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_low: float = 0.2, clip_high: float = 0.2,
                        is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclipped policy gradient: loss = -A * exp(lp - old) (times detached IS weights).

    On-policy (ratio 1) its gradient is -A * grad(lp), REINFORCE with a baseline.
    `clip_low` and `clip_high` are ignored.
    """
    del clip_low, clip_high
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))
    adv = _token_advantages(advantages, ratio)
    token_loss = _apply_is_weights(-adv * ratio, is_weights)
    with torch.no_grad():
        metrics = {
            "policy/clip_frac": ratio.new_zeros(()),
            "policy/ratio_mean": _masked_mean(ratio, mask),
        }
    return token_loss, metrics


# ---------------------------------------------------------------------------------------------
# rollout / trainer mismatch


def tis_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights min(pi_old / pi_rollout, cap), detached.

    Tokens were sampled by the rollout engine, whose numerics differ from the trainer's; these
    weights reweight each token towards the trainer's own distribution, truncated at `cap` to
    bound the variance.
    """
    with torch.no_grad():
        log_w = _as_float(old_logprobs) - _as_float(rollout_logprobs)
        return torch.exp(log_w.clamp(max=math.log(cap))).detach()


def mismatch_metrics(trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the rollout engine's token log-probs are from the trainer's, over masked tokens.

    Tokens are sampled from the rollout engine, so the KL estimates are of
    KL(pi_rollout || pi_trainer): "mismatch/kl_k1" (k1 mean, can be negative), "mismatch/kl"
    (k3 mean), "mismatch/kl_max" (largest per-token k3) and "mismatch/abs_diff" (mean
    |trainer - rollout|). All 0.0 when the mask is empty.
    """
    with torch.no_grad():
        trainer = _as_float(trainer_logprobs)
        rollout = _as_float(rollout_logprobs).to(trainer.dtype)
        m = mask.bool()
        if not bool(m.any()):
            return {"mismatch/kl_k1": 0.0, "mismatch/kl": 0.0, "mismatch/kl_max": 0.0, "mismatch/abs_diff": 0.0}
        k1 = kl_k1(rollout, trainer)[m]
        k3 = kl_k3(rollout, trainer)[m]
        diff = (trainer - rollout).abs()[m]
        return {
            "mismatch/kl_k1": k1.mean().item(),
            "mismatch/kl": k3.mean().item(),
            "mismatch/kl_max": k3.max().item(),
            "mismatch/abs_diff": diff.mean().item(),
        }
