import math

import pytest
import torch

from slipstream.trainer import algorithms as alg
from slipstream.trainer.algorithms import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    kl_k1,
    kl_k3,
    mismatch_metrics,
    tis_weights,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2])


# --------------------------------------------------------------------------- registries


def test_registries_hold_the_configured_names():
    assert {"grpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS)
    assert {"clipped", "vanilla_pg"} <= set(POLICY_LOSSES)
    assert {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"} <= set(LOSS_AGGREGATIONS)
    for registry in (ADVANTAGE_ESTIMATORS, POLICY_LOSSES, LOSS_AGGREGATIONS):
        assert all(callable(fn) for fn in registry.values())


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        alg.register_advantage("grpo")(lambda rewards, group_ids, **kw: rewards)
    assert ADVANTAGE_ESTIMATORS["grpo"] is alg.grpo_advantage


# --------------------------------------------------------------------------- advantages


def test_grpo_hand_values():
    adv = ADVANTAGE_ESTIMATORS["grpo"](REWARDS, GROUPS)
    # group 0: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    assert abs(a - 0.8660254) < 1e-5
    # group 1 (all equal) and group 2 (single sample) are exactly zero
    assert torch.equal(adv[4:], torch.zeros(3))


def test_grpo_without_std_is_dr_grpo():
    adv = ADVANTAGE_ESTIMATORS["grpo"](REWARDS, GROUPS, norm_by_std=False)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_grpo_uses_unbiased_std_and_eps():
    rewards = torch.tensor([0.0, 1.0, 3.0])
    adv = ADVANTAGE_ESTIMATORS["grpo"](rewards, torch.zeros(3, dtype=torch.long), eps=0.5)
    mean = 4.0 / 3.0
    std = math.sqrt(((0 - mean) ** 2 + (1 - mean) ** 2 + (3 - mean) ** 2) / 2)
    expected = torch.tensor([(r - mean) / (std + 0.5) for r in (0.0, 1.0, 3.0)])
    torch.testing.assert_close(adv, expected)


def test_all_equal_group_is_exactly_zero_even_when_mean_is_inexact():
    # In float32, seven 0.1s summed and divided by 7 is not 0.1, nor six 0.3s by 6.
    rewards = torch.tensor([0.1] * 7 + [0.3] * 6 + [0.7] * 2)
    groups = torch.tensor([5] * 7 + [2] * 6 + [9] * 2)
    assert (rewards[:7] - rewards[:7].sum() / 7).abs().max() > 0
    for name in ("grpo", "rloo"):
        for norm in (True, False):
            adv = ADVANTAGE_ESTIMATORS[name](rewards, groups, norm_by_std=norm)
            assert torch.equal(adv, torch.zeros(15)), (name, norm, adv)


def test_rloo_hand_values():
    adv = ADVANTAGE_ESTIMATORS["rloo"](REWARDS, GROUPS)
    # r=1: 1 - (0 + 0 + 1) / 3 = 2/3; r=0: 0 - (1 + 0 + 1) / 3 = -2/3
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    rewards = torch.tensor([3.0, 1.0, 2.0, 5.0, 7.0])
    groups = torch.tensor([4, 4, 4, 1, 1])
    expected = torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0, 5 - 7.0, 7 - 5.0])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["rloo"](rewards, groups), expected)
    # norm_by_std does not change RLOO
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["rloo"](rewards, groups, norm_by_std=False), expected)


def test_advantages_match_a_per_group_reference_on_shuffled_ids():
    gen = torch.Generator().manual_seed(0)
    sizes = [4, 1, 6, 2, 3, 8]
    ids = torch.cat([torch.full((n,), 10 * g + 3) for g, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=gen)
    ids = ids[perm]
    rewards = torch.randn(len(ids), generator=gen, dtype=torch.float64)
    grpo = ADVANTAGE_ESTIMATORS["grpo"](rewards, ids)
    rloo = ADVANTAGE_ESTIMATORS["rloo"](rewards, ids)
    assert grpo.dtype == rewards.dtype and grpo.shape == rewards.shape
    for g in ids.unique():
        sel = ids == g
        r = rewards[sel]
        if r.numel() == 1:
            assert grpo[sel].item() == 0.0 and rloo[sel].item() == 0.0
            continue
        torch.testing.assert_close(grpo[sel], (r - r.mean()) / (r.std() + 1e-6))
        loo = torch.stack([torch.cat([r[:i], r[i + 1:]]).mean() for i in range(len(r))])
        torch.testing.assert_close(rloo[sel], r - loo)


def test_advantage_shape_errors():
    with pytest.raises(ValueError):
        ADVANTAGE_ESTIMATORS["grpo"](torch.zeros(3), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- KL


def test_k3_is_nonnegative_and_zero_when_equal():
    gen = torch.Generator().manual_seed(1)
    lp = torch.randn(64, 32, generator=gen) * 3
    ref = torch.randn(64, 32, generator=gen) * 3
    assert (kl_k3(lp, ref) >= 0).all()
    assert torch.equal(kl_k3(lp, lp), torch.zeros_like(lp))
    assert torch.equal(kl_k1(lp, lp), torch.zeros_like(lp))


def test_k3_hand_value():
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-2.0, -1.0])
    # d = ref - lp = [-1, 1]: exp(d) - d - 1
    expected = torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1])
    torch.testing.assert_close(kl_k3(lp, ref), expected)
    torch.testing.assert_close(kl_k1(lp, ref), torch.tensor([1.0, -1.0]))


def test_k3_and_k1_are_unbiased_estimates_of_kl():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()
    # exact expectation over the categorical
    assert abs((p * kl_k3(p.log(), q.log())).sum().item() - true_kl) < 1e-12
    assert abs((p * kl_k1(p.log(), q.log())).sum().item() - true_kl) < 1e-12
    # Monte Carlo with samples from p
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    k3 = kl_k3(p.log()[x], q.log()[x])
    assert abs(k3.mean().item() - true_kl) < 0.02 * true_kl + 1e-3
    k1 = kl_k1(p.log()[x], q.log()[x])
    assert abs(k1.mean().item() - true_kl) < 0.05 * true_kl + 2e-3
    # k3 has lower variance than k1 here (the reason it is used)
    assert k3.var() < k1.var()


# --------------------------------------------------------------------------- aggregations

AGG_NAMES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def test_aggregation_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kw = dict(num_seqs=2, num_tokens=3, max_tokens=3)
    assert LOSS_AGGREGATIONS["token-mean"](loss, mask, **kw).item() == pytest.approx(7 / 3)
    assert LOSS_AGGREGATIONS["seq-mean-token-mean"](loss, mask, **kw).item() == pytest.approx((1.5 + 4) / 2)
    assert LOSS_AGGREGATIONS["seq-mean-token-sum-norm"](loss, mask, **kw).item() == pytest.approx(7 / 6)


def test_aggregation_ignores_non_finite_values_under_the_mask():
    loss = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    for name in AGG_NAMES:
        out = LOSS_AGGREGATIONS[name](loss, mask, num_seqs=2, num_tokens=2, max_tokens=2)
        assert torch.isfinite(out)


@pytest.mark.parametrize("name", AGG_NAMES)
def test_gradient_accumulation_is_exact(name):
    gen = torch.Generator().manual_seed(3)
    B, T = 7, 6
    lengths = torch.tensor([6, 1, 3, 4, 2, 5, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    features = torch.randn(B, T, generator=gen, dtype=torch.float64)
    weight = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    kw = dict(num_seqs=B, num_tokens=int(mask.sum()), max_tokens=T)
    agg = LOSS_AGGREGATIONS[name]

    full = agg(torch.sin(weight * features) * features, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, weight)

    total = torch.zeros((), dtype=torch.float64)
    grad_sum = torch.zeros((), dtype=torch.float64)
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6), slice(6, 7)):
        part = agg(torch.sin(weight * features[sl]) * features[sl], mask[sl], **kw)
        (g,) = torch.autograd.grad(part, weight)
        total = total + part.detach()
        grad_sum = grad_sum + g
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_sum, full_grad, rtol=1e-12, atol=1e-12)


def test_token_mean_and_seq_mean_differ_on_unequal_lengths():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    kw = dict(num_seqs=2, num_tokens=5, max_tokens=4)
    assert LOSS_AGGREGATIONS["token-mean"](loss, mask, **kw).item() == pytest.approx(7 / 5)
    assert LOSS_AGGREGATIONS["seq-mean-token-mean"](loss, mask, **kw).item() == pytest.approx(2.0)
    assert LOSS_AGGREGATIONS["seq-mean-token-sum-norm"](loss, mask, **kw).item() == pytest.approx(7 / 8)


# --------------------------------------------------------------------------- policy losses


def _grad_at_ratio(ratio: float, adv: float, clip_low=0.2, clip_high=0.28):
    """Return (loss, d loss / d logprob) for a single token with the given ratio and advantage."""
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, _ = POLICY_LOSSES["clipped"](lp, old, torch.tensor([adv], dtype=torch.float64),
                                       torch.ones(1, 1), clip_low=clip_low, clip_high=clip_high)
    (g,) = torch.autograd.grad(loss.sum(), lp)
    return loss.item(), g.item()


def test_clipped_positive_advantage_above_upper_bound_has_zero_gradient():
    loss, g = _grad_at_ratio(1.5, 2.0)
    assert g == 0.0
    assert loss == pytest.approx(-2.0 * 1.28)
    # inside the bound: d(-A * r) / d lp = -A * r
    loss, g = _grad_at_ratio(1.2, 2.0)
    assert g == pytest.approx(-2.0 * 1.2)
    assert loss == pytest.approx(-2.0 * 1.2)
    # A > 0 and ratio below the lower bound is not clipped (pessimistic bound)
    loss, g = _grad_at_ratio(0.5, 2.0)
    assert g == pytest.approx(-2.0 * 0.5)


def test_clipped_negative_advantage_below_lower_bound_has_zero_gradient():
    loss, g = _grad_at_ratio(0.7, -1.5)
    assert g == 0.0
    assert loss == pytest.approx(1.5 * 0.8)
    loss, g = _grad_at_ratio(0.85, -1.5)
    assert g == pytest.approx(1.5 * 0.85)
    # A < 0 and ratio above the upper bound is not clipped
    loss, g = _grad_at_ratio(1.6, -1.5)
    assert g == pytest.approx(1.5 * 1.6)


def test_clip_higher_bounds_are_asymmetric():
    # clip_low = 0.2, clip_high = 0.28: a ratio of 1.25 with A > 0 still learns (it would be
    # clipped by a symmetric 0.2), while 0.75 with A < 0 is clipped at 0.8.
    _, g = _grad_at_ratio(1.25, 1.0)
    assert g == pytest.approx(-1.25)
    _, g = _grad_at_ratio(1.25, 1.0, clip_high=0.2)
    assert g == 0.0
    _, g = _grad_at_ratio(1.29, 1.0)
    assert g == 0.0
    _, g = _grad_at_ratio(0.75, -1.0)
    assert g == 0.0
    _, g = _grad_at_ratio(0.81, -1.0)
    assert g == pytest.approx(0.81)


def test_clipped_metrics():
    ratios = torch.tensor([[1.5, 1.2, 0.5, 1.0], [0.7, 0.85, 1.6, 9.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    _, m = POLICY_LOSSES["clipped"](ratios.log(), torch.zeros_like(ratios), adv, mask,
                                    clip_low=0.2, clip_high=0.28)
    # clipped: 1.5 (A>0, high) and 0.7 (A<0, low); the 9.0 token is masked out
    assert m["policy/clip_frac"].item() == pytest.approx(2 / 7)
    assert m["policy/clip_frac_high"].item() == pytest.approx(1 / 7)
    assert m["policy/clip_frac_low"].item() == pytest.approx(1 / 7)
    assert m["policy/ratio_mean"].item() == pytest.approx((1.5 + 1.2 + 0.5 + 1.0 + 0.7 + 0.85 + 1.6) / 7)
    assert all(not v.requires_grad for v in m.values())


@pytest.mark.parametrize("name", ["clipped", "vanilla_pg"])
def test_policy_gradient_identity_at_ratio_one(name):
    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 4, 5
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(V, (B, T), generator=gen)
    adv = torch.tensor([0.7, -1.3, 0.0], dtype=torch.float64)
    mask = torch.ones(B, T)

    lp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    token_loss, metrics = POLICY_LOSSES[name](lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.28)
    (g_loss,) = torch.autograd.grad(token_loss.sum(), logits)

    lp2 = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    (g_pg,) = torch.autograd.grad((-adv[:, None] * lp2).sum(), logits)
    torch.testing.assert_close(g_loss, g_pg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_loss.detach(), (-adv[:, None]).expand(B, T))
    assert metrics["policy/ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["policy/clip_frac"].item() == 0.0


@pytest.mark.parametrize("name", ["clipped", "vanilla_pg"])
def test_is_weights_scale_the_loss_and_are_detached(name):
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = lp.detach().clone()
    w = torch.tensor([[0.5, 2.0]], requires_grad=True)
    adv = torch.tensor([3.0])
    loss, _ = POLICY_LOSSES[name](lp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, is_weights=w)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.5, -6.0]]))
    loss.sum().backward()
    assert w.grad is None
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.5, -6.0]]))


def test_vanilla_pg_is_not_clipped():
    lp = torch.tensor([[math.log(3.0)]], requires_grad=True)
    loss, _ = POLICY_LOSSES["vanilla_pg"](lp, torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1),
                                          clip_low=0.2, clip_high=0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-6.0)
    assert lp.grad.item() == pytest.approx(-6.0)


def test_policy_loss_under_an_aggregation_is_finite_with_garbage_padding():
    lp = torch.tensor([[-1.0, 0.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -500.0], [-0.4, 500.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    token_loss, _ = POLICY_LOSSES["clipped"](lp, old, torch.tensor([1.0, -1.0]), mask,
                                             clip_low=0.2, clip_high=0.2)
    out = LOSS_AGGREGATIONS["token-mean"](token_loss, mask, num_seqs=2, num_tokens=2, max_tokens=2)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(lp.grad).all()
    assert lp.grad[:, 1].abs().sum() == 0


# --------------------------------------------------------------------------- TIS and mismatch


def test_tis_weights_are_capped_and_detached():
    old = torch.tensor([[0.0, -1.0, -3.0, 2.0]], requires_grad=True)
    rollout = torch.tensor([[0.0, -1.5, -1.0, -40.0]])
    w = tis_weights(old, rollout, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), math.exp(-2.0), 2.0]]))
    assert not w.requires_grad and w.grad_fn is None
    assert (w <= 2.0).all()


def test_mismatch_metrics_hand_values():
    trainer = torch.tensor([[0.0, -1.0, -7.0], [-0.2, 3.0, 3.0]])
    rollout = torch.tensor([[0.0, -0.5, 0.0], [-0.4, -9.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m = mismatch_metrics(trainer, rollout, mask)
    # masked-in diffs trainer - rollout: 0, -0.5, 0.2 (log of p_trainer / p_rollout)
    diffs = [0.0, -0.5, 0.2]
    k3 = [math.exp(d) - d - 1 for d in diffs]
    assert m["mismatch/kl_k1"] == pytest.approx(sum(-d for d in diffs) / 3, abs=1e-7)
    assert m["mismatch/kl"] == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert m["mismatch/kl_max"] == pytest.approx(max(k3), rel=1e-5)
    assert m["mismatch/abs_diff"] == pytest.approx(0.7 / 3, rel=1e-5)
    assert all(isinstance(v, float) for v in m.values())
    assert mismatch_metrics(trainer, trainer, mask) == {
        "mismatch/kl_k1": 0.0, "mismatch/kl": 0.0, "mismatch/kl_max": 0.0, "mismatch/abs_diff": 0.0}
    assert mismatch_metrics(trainer, rollout, torch.zeros_like(mask))["mismatch/kl"] == 0.0
