"""PPO's critic: the policy's architecture with a scalar value head, trained on GAE returns.

The value of response token j's state (the prompt and tokens 0..j-1) is read from the hidden
state at the position that predicts token j, the same positions whose logits give the actor's
log-probs.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from slipstream.config import AlgorithmConfig, TrainerConfig
from slipstream.trainer import algorithms as alg
from slipstream.trainer.actor import autocast_for, backward_with_train_attention, micro_batching
from slipstream.trainer.backends import TrainBackend
from slipstream.trainer.batch import RolloutBatch, length_grouped, per_response_token
from slipstream.trainer.distributed import DistContext


class ValueModel(nn.Module):
    """A causal LM's transformer body (no LM head) and a linear head giving one value per position."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        # Zero init: every value starts at 0, so the first advantages are the plain returns
        # instead of noise from a random head.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> "ValueModel":
        """A critic initialised from the policy's own weights (its `base_model`, copied)."""
        backbone = copy.deepcopy(policy.base_model)
        backbone.requires_grad_(True)
        return cls(backbone, policy.config.hidden_size)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        # A fresh tensor, not a view: FSDP2 hooks its backward on the module's output.
        return self.value_head(hidden).squeeze(-1).float().clone()


def response_values(module: nn.Module, batch: RolloutBatch, device: torch.device) -> torch.Tensor:
    """Values [B, R] of the states before each response token, 0 on padding."""
    P, R = batch.prompt_width, batch.response_width
    with autocast_for(device):
        values = module(batch.input_ids.to(device), batch.attention_mask.to(device), batch.position_ids.to(device))
    return values[:, P - 1 : P - 1 + R].float() * batch.response_mask.to(device)


class Critic:
    def __init__(self, backend: TrainBackend, tcfg: TrainerConfig, acfg: AlgorithmConfig, ctx: DistContext):
        self.backend, self.tcfg, self.acfg, self.ctx = backend, tcfg, acfg, ctx
        self.device = ctx.device
        self.cut = micro_batching(tcfg, ctx)

    def _values(self, batch: RolloutBatch) -> torch.Tensor:
        with torch.no_grad():
            return per_response_token(batch, self.cut, self.device, lambda part: (
                response_values(self.backend.module, part, self.device))).cpu()

    def advantages(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages, values, returns), each [B, R]: GAE on the outcome reward, advantages
        whitened over the global batch's response tokens."""
        self.backend.train(False)
        values = self._values(batch)
        mask = batch.response_mask
        token_rewards = alg.outcome_token_rewards(batch.rewards, mask)
        adv, returns = alg.gae(token_rewards, values, mask, gamma=self.acfg.gamma, lam=self.acfg.lam)
        adv = alg.masked_whiten(adv, mask, reduce=self.ctx.all_reduce_sum)
        return adv, values, returns

    def update(self, batch: RolloutBatch, old_values: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """`trainer.mini_batches` steps on the clipped value loss (token mean over the global batch)."""
        self.backend.train()
        self.backend.set_lr(self.acfg.critic_lr)
        size = -(-batch.size // self.tcfg.mini_batches)
        old_values, returns = old_values.to(self.device), returns.to(self.device)
        # loss, clip frac, value mean, return mean (token-weighted), tokens: on the device until the end
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        norms = []
        for start in range(0, batch.size, size):
            mini = batch.rows(start, start + size)
            num_tokens = max(int(self.ctx.all_reduce_sum(mini.response_mask.sum().reshape(1))[0]), 1)
            parts = length_grouped(mini, self.cut, self.device)  # rows of similar length, padding cut
            for i, micro in enumerate(parts):
                part, rows, width = micro.batch, start + micro.rows, micro.width
                mask = part.response_mask
                values = response_values(self.backend.module, part, self.device)
                token_loss, metrics = alg.clipped_value_loss(values, old_values[rows, :width], returns[rows, :width],
                                                             mask, clip=self.acfg.value_clip)
                loss = alg.agg_token_mean(token_loss, mask, num_seqs=0, num_tokens=num_tokens, max_tokens=0)
                backward_with_train_attention(self.backend, loss * self.ctx.world_size, last=i == len(parts) - 1)
                w = mask.sum()
                sums += torch.stack([loss.detach() / self.tcfg.mini_batches, metrics["critic/vf_clip_frac"] * w,
                                     metrics["critic/value_mean"] * w, metrics["critic/return_mean"] * w,
                                     w]).double()
            if not math.isfinite(float(sums[0])):  # before the optimizer step: the weights stay as they were
                raise FloatingPointError(f"non-finite critic loss: {float(sums[0])}")
            norms.append(self.backend.step())
        sums = sums.cpu()
        total = self.ctx.all_reduce_sum(sums)
        tokens = max(float(total[4]), 1.0)
        return {"critic/loss": float(total[0]), "critic/vf_clip_frac": float(total[1]) / tokens,
                "critic/value_mean": float(total[2]) / tokens, "critic/return_mean": float(total[3]) / tokens,
                "critic/grad_norm": max(norms)}
