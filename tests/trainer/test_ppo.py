"""PPO pieces (GAE, value clipping, whitening, the critic) and REINFORCE++ against hand-computed values."""

import copy

import pytest
import torch

from slipstream.config import AlgorithmConfig, TrainerConfig
from slipstream.rollout.types import Completion
from slipstream.trainer import algorithms as alg
from slipstream.trainer.backends import OptimizerSpec, build_backend
from slipstream.trainer.batch import build_batch
from slipstream.trainer.critic import Critic, ValueModel, response_values
from slipstream.trainer.distributed import DistContext

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_outcome_reward_sits_on_the_last_response_token():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    out = alg.outcome_token_rewards(torch.tensor([1.0, 2.0, 5.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_matches_the_hand_computed_recursion():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72); row 1 ends after two tokens (its third is padding).
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, -0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = alg.outcome_token_rewards(torch.tensor([1.0, 2.0]), mask)
    adv, ret = alg.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.4 = 0.6; d1 = 0.9*0.4 - 0.2 = 0.16; d0 = 0.9*0.2 - 0.5 = -0.32
    #        A2 = 0.6, A1 = 0.16 + 0.72*0.6 = 0.592, A0 = -0.32 + 0.72*0.592 = 0.10624
    # row 1: d1 = 2 - (-0.3) = 2.3 (no bootstrap past the end); d0 = 0.9*(-0.3) - 0.1 = -0.37
    #        A1 = 2.3, A0 = -0.37 + 0.72*2.3 = 1.286; the padded value 9.0 never enters
    expected_adv = torch.tensor([[0.10624, 0.592, 0.6], [1.286, 2.3, 0.0]])
    assert torch.allclose(adv, expected_adv, atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.60624, 0.792, 1.0], [1.386, 2.0, 0.0]]), atol=1e-6)


def test_gae_with_lambda_one_and_gamma_one_is_reward_minus_value():
    values = torch.tensor([[0.3, -0.2, 0.7, 0.1]])
    mask = torch.ones(1, 4)
    adv, ret = alg.gae(alg.outcome_token_rewards(torch.tensor([1.0]), mask), values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, 1.0 - values) and torch.allclose(ret, torch.ones(1, 4))


def test_value_loss_clips_moves_beyond_the_range():
    values = torch.tensor([[1.0, 0.4]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, metrics = alg.clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.5+0.2 = 0.7 -> (0.7-2)^2 = 1.69; the max, halved: 0.845
    # token 1: 0.4 is inside [0.3, 0.7]: both terms (0.4+1)^2 = 1.96 -> 0.98
    assert torch.allclose(loss, torch.tensor([[0.845, 0.98]]))
    assert float(metrics["critic/vf_clip_frac"]) == pytest.approx(0.5)
    loss.sum().backward()
    # the clipped term is selected for token 0, so its value gets no gradient
    assert values.grad[0, 0] == 0 and values.grad[0, 1] == pytest.approx(1.4)
    unclipped, _ = alg.clipped_value_loss(values, old, returns, mask, clip=0.0)
    assert torch.allclose(unclipped, torch.tensor([[0.5, 0.98]]))


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # mean 2, variance (1 + 0 + 1) / 3
    s = (2.0 / 3.0) ** 0.5
    assert torch.allclose(alg.masked_whiten(x, mask), torch.tensor([[-1 / s, 0.0], [1 / s, 0.0]]), atol=1e-6)


def test_reinforce_pp_normalises_over_the_whole_batch():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = alg.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, groups)
    # mean 4/7; unbiased variance (4 * (3/7)^2 + 3 * (4/7)^2) / 6 = 2/7
    std = (2.0 / 7.0) ** 0.5
    assert torch.allclose(adv, torch.where(rewards > 0, 3 / 7 / std, -4 / 7 / std), atol=1e-5)
    # groups 1 and 2 have equal rewards: GRPO gives them nothing, REINFORCE++ still does
    assert adv[4] != 0 and adv[6] != 0
    assert torch.allclose(alg.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, groups, norm_by_std=False),
                          rewards - 4 / 7)


def test_per_token_advantages_enter_the_clipped_loss():
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    loss, _ = alg.POLICY_LOSSES["clipped"](lp, lp, adv, torch.ones(2, 3))
    assert torch.equal(loss, -adv)  # ratio 1: the loss is -A token by token
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\) or \(2, 3\)"):
        alg.POLICY_LOSSES["clipped"](lp, lp, torch.zeros(3), torch.ones(2, 3))


def _batch():
    prompt = [3, 4, 5]
    comps = [Completion(str(i), "g", prompt, toks, [0.0] * len(toks), "stop")
             for i, toks in enumerate([[10, 11, 12], [20, 21], [10, 11, 12], [30, 31, 32, 33]])]
    return build_batch(comps, [1.0, 0.0, 1.0, 0.0], pad_id=0)


def test_critic_starts_at_zero_and_learns_the_returns(tiny_model):
    policy = copy.deepcopy(tiny_model[0])
    module = ValueModel.from_policy(policy)
    # the body is a copy of the policy's: same hidden states
    batch = _batch()
    assert torch.equal(response_values(module, batch, CPU.device), torch.zeros(4, 4))
    tcfg = TrainerConfig(micro_batch_size=2, max_grad_norm=1e9)
    acfg = AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0, value_clip=0.0, critic_lr=3e-3)
    backend = build_backend("local", module, CPU, OptimizerSpec(lr=acfg.critic_lr, max_grad_norm=1e9))
    critic = Critic(backend, tcfg, acfg, CPU)
    adv, values, returns = critic.advantages(batch)
    # values 0, gamma = lam = 1: every token's return is its sequence's reward
    assert torch.equal(returns, batch.rewards[:, None] * batch.response_mask)
    assert torch.allclose((adv * batch.response_mask).sum(), torch.tensor(0.0), atol=1e-5)
    losses = [critic.update(batch, values, returns)["critic/loss"] for _ in range(15)]
    assert losses[-1] < 0.4 * losses[0]  # token 0 (same prompt, rewards 1,0,1,0) cannot go below 0.125
    assert torch.equal(policy.model.embed_tokens.weight, tiny_model[0].model.embed_tokens.weight)  # not shared


def test_critic_micro_batches_of_grouped_lengths_give_the_full_batch_step(tiny_model):
    results = []
    for mb in (4, 2, 1):  # 2 and 1: rows grouped by length, each micro-batch cut to its longest response
        module = ValueModel.from_policy(copy.deepcopy(tiny_model[0]))
        torch.nn.init.normal_(module.value_head.weight, std=0.1, generator=torch.Generator().manual_seed(0))
        acfg = AlgorithmConfig(advantage="gae", gamma=0.9, lam=0.8, value_clip=0.05, critic_lr=1e-2)
        backend = build_backend("local", module, CPU, OptimizerSpec(lr=acfg.critic_lr, max_grad_norm=1e9))
        critic = Critic(backend, TrainerConfig(micro_batch_size=mb, max_grad_norm=1e9), acfg, CPU)
        batch = _batch()
        _, values, returns = critic.advantages(batch)
        metrics = critic.update(batch, values, returns)
        results.append((metrics, module.value_head.weight.detach().clone()))
    for metrics, weight in results[1:]:
        assert metrics == pytest.approx(results[0][0], rel=1e-4, abs=1e-6)
        assert torch.allclose(weight, results[0][1], atol=1e-6)
    assert not torch.allclose(results[0][1], ValueModel.from_policy(tiny_model[0]).value_head.weight)
