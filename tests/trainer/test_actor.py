import copy

import pytest

import torch

from slipstream.config import AlgorithmConfig, TrainerConfig
from slipstream.rollout.types import Completion
from slipstream.trainer.actor import Actor, response_logprobs
from slipstream.trainer.backends import OptimizerSpec, build_backend
from slipstream.trainer.batch import build_batch
from slipstream.trainer.distributed import DistContext

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _actor(model, tcfg: TrainerConfig, acfg: AlgorithmConfig, ref_model=None, temperature: float = 1.0) -> Actor:
    backend = build_backend("local", model, CPU, OptimizerSpec(tcfg.lr, tuple(tcfg.betas), tcfg.weight_decay,
                                                            tcfg.max_grad_norm))
    ref = build_backend("local", ref_model, CPU, None) if ref_model is not None else None
    return Actor(backend, tcfg, acfg, CPU, ref=ref, temperature=temperature)


def _batch(model):
    prompt = [3, 4, 5]
    comps = [Completion(str(i), "g", prompt, toks, [0.0] * len(toks), "stop")
             for i, toks in enumerate([[10, 11, 12], [20, 21], [10, 11, 12], [30, 31, 32, 33]])]
    batch = build_batch(comps, [1.0, 0.0, 1.0, 0.0], pad_id=0)
    # rollout logprobs = the model's own, so the importance weights are exactly 1
    batch.rollout_logprobs = response_logprobs(model, batch, torch.device("cpu")).detach()
    return batch


def test_grpo_update_moves_probability_towards_rewarded_samples(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    actor = _actor(model, TrainerConfig(lr=1e-2, micro_batch_size=2), AlgorithmConfig())
    batch = _batch(model)
    before = response_logprobs(model, batch, torch.device("cpu")).detach().sum(-1)
    adv = actor.advantages(batch)
    assert adv[0] > 0 and adv[1] < 0
    metrics = actor.update(batch, adv, step=0, max_tokens=4)
    after = response_logprobs(model, batch, torch.device("cpu")).detach().sum(-1)
    assert after[0] > before[0] and after[3] < before[3]
    assert abs(metrics["mismatch/kl"]) < 1e-6 and metrics["grad_norm"] > 0


def _update_gradient(model, tcfg: TrainerConfig, acfg: AlgorithmConfig) -> torch.Tensor:
    """The flat gradient of one update of `model` on `_batch`, read just before the optimizer
    step (the backend frees the gradients right after it)."""
    actor = _actor(model, tcfg, acfg)
    batch = _batch(model)
    real_step, grads = actor.backend.step, []

    def step_recording_grads():
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        return real_step()

    actor.backend.step = step_recording_grads
    actor.update(batch, actor.advantages(batch), step=0, max_tokens=4)
    return grads[0]


def test_micro_batching_gives_the_full_batch_gradient(tiny_model):
    # 2 and 1 rows, and 12 tokens (rows of widths 2 | 3 | 3, 4 with the 3-token prompt): rows
    # grouped by length, each micro-batch cut to its longest response
    grads = [_update_gradient(copy.deepcopy(tiny_model[0]),
                              TrainerConfig(lr=1e-12, micro_batch_size=mb, micro_batch_tokens=tokens, max_grad_norm=1e9),
                              AlgorithmConfig(loss_agg="token-mean"))
             for mb, tokens in ((4, 0), (2, 0), (1, 0), (4, 12))]
    for g in grads[1:]:
        assert torch.allclose(grads[0], g, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_recomputes_with_the_forwards_attention_kernel(tiny_model, monkeypatch):
    # The backward pass recomputes checkpointed layers; it must run them on the SDPA backend the
    # forward ran (here math only, where the CPU's own choice for a padded batch differs), and
    # give the gradients of the update without checkpointing.
    import slipstream.trainer.actor as actor_module
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(actor_module, "TRAIN_SDPA_BACKENDS", [SDPBackend.MATH])
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model[0])
        if checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        grads.append(_update_gradient(model, TrainerConfig(lr=1e-12, micro_batch_size=2, max_grad_norm=1e9),
                                      AlgorithmConfig()))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_a_non_finite_loss_raises_before_the_optimizer_step(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    actor = _actor(model, TrainerConfig(lr=1e-2, micro_batch_size=2), AlgorithmConfig())
    real = actor.policy_loss
    actor.policy_loss = lambda lp, *a, **kw: (lambda out: (out[0] * float("nan"), out[1]))(real(lp, *a, **kw))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = _batch(model)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3: nan"):
        actor.update(batch, actor.advantages(batch), step=3, max_tokens=4)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k


def test_kl_to_reference_pulls_back(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    ref = copy.deepcopy(model).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference first
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    actor = _actor(model, TrainerConfig(lr=1e-4, micro_batch_size=4), AlgorithmConfig(kl_coef=1.0), ref_model=ref)
    batch = _batch(model)
    batch.rewards.fill_(1.0)  # zero advantages: only the KL term acts
    m1 = actor.update(batch, actor.advantages(batch), step=0, max_tokens=4)
    m2 = actor.update(batch, actor.advantages(batch), step=1, max_tokens=4)
    m3 = actor.update(batch, actor.advantages(batch), step=2, max_tokens=4)
    assert m1["kl_ref"] > 0 and m3["kl_ref"] < m2["kl_ref"] < m1["kl_ref"]


def test_trainer_logprobs_match_the_rollout_at_temperature(tiny_model):
    from slipstream.rollout.hf_backend import HFRolloutBackend
    from slipstream.rollout.types import Request, SamplingParams

    model, tok = copy.deepcopy(tiny_model[0]), tiny_model[1]
    params = SamplingParams(n=4, temperature=0.7, max_tokens=10, seed=0)
    comps = HFRolloutBackend(model, tok).generate([Request([1, 70, 71, 72], params, "g", "r")])
    batch = build_batch(comps, [1.0, 0.0, 0.0, 1.0], pad_id=tok.pad_token_id)
    actor = _actor(model, TrainerConfig(lr=1e-9), AlgorithmConfig(), temperature=0.7)
    metrics = actor.update(batch, actor.advantages(batch), step=0, max_tokens=10)
    assert metrics["mismatch/kl_max"] < 1e-5 and metrics["tis/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    untempered = _actor(copy.deepcopy(model), TrainerConfig(lr=1e-9), AlgorithmConfig())
    assert untempered.update(batch, untempered.advantages(batch), step=0, max_tokens=10)["mismatch/kl"] > 1e-3


def test_several_mini_batches_use_the_pre_update_policy_as_old(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    actor = _actor(model, TrainerConfig(lr=5e-2, micro_batch_size=1, mini_batches=2), AlgorithmConfig(clip_high=0.2))
    batch = _batch(model)
    before = response_logprobs(model, batch, torch.device("cpu")).detach()
    metrics = actor.update(batch, actor.advantages(batch), step=0, max_tokens=4)
    after = response_logprobs(model, batch, torch.device("cpu")).detach()
    assert not torch.allclose(before, after)
    # the second mini-batch saw a policy already moved by the first: its ratios differ from 1
    assert metrics["policy/ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert metrics["mismatch/kl_max"] < 1e-5  # old (pre-update) log-probs equal the rollout's here
