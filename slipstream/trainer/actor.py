"""The actor: response log-probs and the policy update, through any training backend.

Parameters stay in float32; on CUDA the forward runs under bf16 autocast (mixed precision), on
CPU everything is float32. Under SPMD each rank updates on its own rows; loss normalisers
(sequence and token counts) are those of the global batch and each rank's loss is scaled by the
number of ranks, because the backends average gradients across ranks: the update is then the
one a single process would take on the whole batch.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from slipstream.config import AlgorithmConfig, TrainerConfig
from slipstream.trainer import algorithms as alg
from slipstream.trainer.backends import TrainBackend
from slipstream.trainer.batch import MicroBatching, RolloutBatch, length_grouped, per_response_token
from slipstream.trainer.distributed import DistContext, global_advantages


# The trainer's attention over padded micro-batches: any SDPA backend but cuDNN's. The padding
# mask rules out flash on CUDA; left to itself, torch then spent 1.4-2.5 s on a forward + backward
# at a sequence length it had not seen before (length-grouped micro-batches meet a new one almost
# every time; these were the update's spikes) and gave non-finite gradients at lengths that are
# multiples of 64, where left-padded rows are fully masked. The memory-efficient kernel takes the
# same 0.10-0.15 s at every length, with finite gradients (benchmarks/update_attention.py).
TRAIN_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def autocast_for(device: torch.device):
    """The trainer's forward context: bf16 autocast on CUDA (float32 on the CPU), and its SDPA backends."""
    with sdpa_kernel(TRAIN_SDPA_BACKENDS):
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield


def backward_with_train_attention(backend: TrainBackend, loss: torch.Tensor, last: bool) -> None:
    """`backend.backward` under the forward's SDPA backends: gradient checkpointing recomputes the
    forward inside the backward pass, which must choose the attention kernel the forward chose
    (else the recomputed tensors differ from the saved ones and autograd raises)."""
    with sdpa_kernel(TRAIN_SDPA_BACKENDS):
        backend.backward(loss, last=last)


def response_logprobs(model, batch: RolloutBatch, device: torch.device, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [B, R] of the response tokens under `model` (only R + 1 positions reach the LM head).

    The policy being trained is the one the rollout samples from, softmax(logits / temperature);
    top-k/top-p truncation is not applied here, and the difference it makes to the rollout's
    log-probs is part of the measured mismatch that truncated importance sampling corrects.
    """
    R = batch.response_width
    ids = batch.input_ids.to(device)
    with autocast_for(device):
        out = model(
            input_ids=ids,
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=False,
            logits_to_keep=R + 1,
        )
    logits = out.logits[:, :R].float()  # position P-1+j predicts response token j
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    targets = ids[:, batch.prompt_width :]
    lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp * batch.response_mask.to(device)  # zeros on padding keep later math finite


def micro_batching(tcfg: TrainerConfig, ctx: DistContext) -> MicroBatching:
    """The configured micro-batches. With a token budget and several ranks, each rank runs as many
    as the rank that needs most (by rows, ranks holding as many rows already run as many)."""
    agree = ctx.max_over_ranks if tcfg.micro_batch_tokens > 0 and ctx.active and ctx.world_size > 1 else None
    return MicroBatching(tcfg.micro_batch_size, tcfg.micro_batch_tokens, agree)


def lr_at(step: int, cfg: TrainerConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


class Actor:
    def __init__(self, backend: TrainBackend, tcfg: TrainerConfig, acfg: AlgorithmConfig, ctx: DistContext,
                 ref: TrainBackend | None = None, temperature: float = 1.0):
        self.backend = backend
        self.model = backend.module
        self.temperature = temperature
        self.tcfg = tcfg
        self.acfg = acfg
        self.ctx = ctx
        self.device = ctx.device
        self.ref = ref
        self.policy_loss = alg.POLICY_LOSSES[acfg.policy_loss]
        self.aggregate = alg.LOSS_AGGREGATIONS[acfg.loss_agg]
        self.cut = micro_batching(tcfg, ctx)

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """One advantage per sequence from the registered estimator, over the global batch."""
        estimator = alg.ADVANTAGE_ESTIMATORS[self.acfg.advantage]
        return global_advantages(estimator, batch.rewards, batch.group_ids, self.ctx,
                                 norm_by_std=self.acfg.norm_adv_by_std)

    def update(self, batch: RolloutBatch, advantages: torch.Tensor, step: int, max_tokens: int,
               on_micro_batch=None) -> dict[str, float]:
        """`trainer.mini_batches` optimizer steps over the batch, each accumulated over micro-batches.

        `advantages` is [B] (per sequence) or [B, R] (per token, PPO). With one mini-batch the
        "old" policy is the current one (ratio 1, clipping inactive) and no extra forward is
        needed; with several, the old log-probs are computed once up front and the clipped ratio
        bounds how far later mini-batches move.
        """
        self.backend.train()
        self.backend.set_lr(lr_at(step, self.tcfg))
        old_all = None
        if self.tcfg.mini_batches > 1:
            with torch.no_grad():
                old_all = per_response_token(batch, self.cut, self.device, lambda part: (
                    response_logprobs(self.model, part, self.device, self.temperature)))
        size = -(-batch.size // self.tcfg.mini_batches)
        totals: dict[str, float] = {}
        olds, grad_norms, losses = [], [], []
        for start in range(0, batch.size, size):
            mini = batch.rows(start, start + size)
            old_mini = old_all[start : start + size] if old_all is not None else None
            loss, grad_norm, old = self._optimizer_step(mini, advantages[start : start + size], old_mini, step,
                                                        max_tokens, totals, on_micro_batch)
            losses.append(loss)
            grad_norms.append(grad_norm)
            olds.append(old)
        old = torch.cat(olds)
        tokens = float(batch.response_mask.sum())
        # Token-weighted sums and counts of every rank at once: one collective for all metrics.
        keys = sorted(totals)
        mismatch = alg.mismatch_metrics(old, batch.rollout_logprobs, batch.response_mask)
        mean_keys = [k for k in mismatch if not k.endswith("_max")]
        local = torch.tensor([sum(losses) / len(losses), tokens] + [totals[k] for k in keys]
                             + [mismatch[k] * tokens for k in mean_keys], dtype=torch.float64)
        summed = self.ctx.all_reduce_sum(local)
        denom = max(float(summed[1]), 1.0)
        out = {"loss": float(summed[0]), "grad_norm": max(grad_norms), "lr": lr_at(step, self.tcfg)}
        for i, k in enumerate(keys):
            out[k] = float(summed[2 + i]) / denom
        for i, k in enumerate(mean_keys):
            out[k] = float(summed[2 + len(keys) + i]) / denom
        out["mismatch/kl_max"] = float(self.ctx.all_reduce_max(torch.tensor([mismatch["mismatch/kl_max"]]))[0])
        return out

    def _optimizer_step(self, mini: RolloutBatch, advantages: torch.Tensor, old_all: torch.Tensor | None, step: int,
                        max_tokens: int, totals: dict[str, float], on_micro_batch) -> tuple[float, float, torch.Tensor]:
        counts = self.ctx.all_reduce_sum(torch.tensor([float(mini.response_mask.sum()), float(mini.size)]))
        num_tokens, num_seqs = max(int(counts[0]), 1), int(counts[1])
        scale = self.ctx.world_size  # the backends average gradients over ranks; the loss is already global
        # The losses are per row with global normalisers, so grouping rows by length changes no gradient.
        parts = length_grouped(mini, self.cut, self.device)
        advantages = advantages.to(self.device)
        old_all = old_all.to(self.device) if old_all is not None else None
        old_out = torch.zeros(mini.size, mini.response_width, device=self.device)
        # Loss and metric sums stay on the device until the last micro-batch: one host
        # synchronisation per optimizer step, not one per micro-batch and metric.
        sums: dict[str, torch.Tensor] = {}

        def add(key: str, value: torch.Tensor) -> None:
            sums[key] = sums[key] + value if key in sums else value

        for i, micro in enumerate(parts):
            part, width = micro.batch, micro.width
            mask = part.response_mask
            lp = response_logprobs(self.model, part, self.device, self.temperature)
            old = lp.detach() if old_all is None else old_all[micro.rows, :width]
            adv = advantages[micro.rows]
            if adv.dim() == 2:  # per token (PPO)
                adv = adv[:, :width]
            is_w = alg.tis_weights(old, part.rollout_logprobs, self.acfg.tis_cap) if self.acfg.tis else None
            token_loss, metrics = self.policy_loss(lp, old, adv, mask, clip_low=self.acfg.clip_low,
                                                   clip_high=self.acfg.clip_high, is_weights=is_w)
            if self.ref is not None and self.acfg.kl_coef > 0:
                with torch.no_grad():
                    ref_lp = response_logprobs(self.ref.module, part, self.device, self.temperature)
                kl = alg.kl_k3(lp, ref_lp)
                token_loss = token_loss + self.acfg.kl_coef * kl
                add("kl_ref", (kl.detach() * mask).sum())
            loss = self.aggregate(token_loss, mask, num_seqs=num_seqs, num_tokens=num_tokens, max_tokens=max_tokens)
            backward_with_train_attention(self.backend, loss * scale, last=i == len(parts) - 1)
            add("loss", loss.detach())
            weight = mask.sum()
            for k, v in metrics.items():
                add(k, v.detach() * weight)
            if is_w is not None:
                add("tis/weight_mean", (is_w * mask).sum())
                add("tis/capped_frac", ((is_w >= self.acfg.tis_cap) * mask).sum())
            old_out[micro.rows, :width] = old
            if on_micro_batch is not None:
                on_micro_batch(part.size)
        keys = list(sums)
        values = dict(zip(keys, torch.stack([sums[k].float() for k in keys]).tolist()))
        loss_sum = values.pop("loss")
        if not math.isfinite(loss_sum):  # before the optimizer step: the weights stay as they were
            raise FloatingPointError(f"non-finite loss at step {step}: {loss_sum}")
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v
        try:
            grad_norm = self.backend.step()
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {step}") from None
        return loss_sum, grad_norm, old_out.cpu()
