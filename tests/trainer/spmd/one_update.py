"""One actor update and one critic update on a fixed batch, on any backend and number of ranks.

Run alone (`python one_update.py BACKEND OUT`) or under torchrun; every rank takes its share of
the same global batch (whole groups), and every rank writes the loss, gradient norms and the full
parameters after the update to OUT.RANK, for comparison with the single-process run and with each
other. A rank that stops before its file is written fails the comparison.

After writing, the ranks leave the job together (shutdown_distributed) and end with os._exit.
On a loaded 2-core CPU a ZeRO-2 rank aborted now and then after its step ("terminate called
without an active exception": a native thread torn down while it runs); gloo's worker threads
outlive destroy_process_group (the backends keep references to the groups), so the ranks do not
leave them to the interpreter's finalization.
"""

import os
import sys

import torch

from slipstream.config import AlgorithmConfig, TrainerConfig
from slipstream.models.tiny import tiny_config
from slipstream.rollout.types import Completion
from slipstream.trainer.actor import Actor
from slipstream.trainer.backends import OptimizerSpec, build_backend
from slipstream.trainer.batch import build_batch
from slipstream.trainer.critic import Critic, ValueModel
from slipstream.trainer.distributed import init_distributed, shard_groups, shutdown_distributed


def global_batch():
    """Four groups of three samples with different lengths, prompts and rewards."""
    gen = torch.Generator().manual_seed(1)
    comps, rewards = [], []
    for g in range(4):
        prompt = torch.randint(3, 200, (3 + g,), generator=gen).tolist()
        for i in range(3):
            toks = torch.randint(3, 200, (2 + (g + i) % 4,), generator=gen).tolist()
            lps = (-torch.rand(len(toks), generator=gen)).tolist()
            comps.append(Completion(f"{g}-{i}", f"g{g}", prompt, toks, lps, "stop"))
            rewards.append(float((g + i) % 3 == 0))
    return comps, rewards


def main(kind: str, out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=60, need_group=kind != "local")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(32, 2)).float()
    critic_module = ValueModel.from_policy(model)
    torch.nn.init.normal_(critic_module.value_head.weight, std=0.1)  # non-zero values: GAE and clipping act
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    comps, rewards = global_batch()
    groups = [list(range(3 * g, 3 * g + 3)) for g in range(4)]
    mine = [i for grp in shard_groups(groups, ctx) for i in grp]
    batch = build_batch([comps[i] for i in mine], [rewards[i] for i in mine], pad_id=0)

    # One mini-batch: with several, a mini-batch takes a slice of every rank's rows, which is another
    # split of the batch than one process makes.
    # "tokens": micro-batches by a 14-token budget, for which the two ranks' rows need 5 and 6
    # (their forward passes must still pair up: the ranks agree on 6)
    tcfg = TrainerConfig(lr=1e-2, micro_batch_size=2, mini_batches=1, max_grad_norm=1.0,
                         micro_batch_tokens=14 if "tokens" in sys.argv[3:] else 0)
    # REINFORCE++ (global normalisation) and token-mean (global token count): both need the global batch.
    acfg = AlgorithmConfig(advantage="reinforce_pp", loss_agg="token-mean", kl_coef=0.1, critic_lr=1e-2,
                           gamma=0.9, lam=0.8, value_clip=0.05)
    # deepspeed: argv[3] is the ZeRO stage, argv[4] (optional) "offload" for ZeRO-Offload;
    # fsdp2: argv[3:] may hold "keep-gathered" (the layers stay gathered from forward to backward)
    # and "grouped" (both layers of the tiny model in one unit)
    if kind == "fsdp2":
        extra = {"reshard_after_forward": "keep-gathered" not in sys.argv[3:],
                 "fsdp_min_unit_params": 10**9 if "grouped" in sys.argv[3:] else 0}
    else:
        extra = {"zero_stage": int(sys.argv[3]), "cpu_offload": sys.argv[4:] == ["offload"]} if len(sys.argv) > 3 else {}
    ref = build_backend(kind, LlamaForCausalLM(tiny_config(32, 2)).float(), ctx, None, **extra)
    actor_backend = build_backend(kind, model, ctx, OptimizerSpec(tcfg.lr, max_grad_norm=1.0), **extra)
    actor = Actor(actor_backend, tcfg, acfg, ctx, ref=ref)
    critic_backend = build_backend(kind, critic_module, ctx, OptimizerSpec(acfg.critic_lr, max_grad_norm=1.0), **extra)
    critic = Critic(critic_backend, tcfg, acfg, ctx)

    adv = actor.advantages(batch)
    metrics = actor.update(batch, adv, step=0, max_tokens=8)
    gae_adv, values, returns = critic.advantages(batch)
    cmetrics = critic.update(batch, values, returns)
    actor_params = {k: v.detach().clone() for k, v in actor.backend.named_full_parameters()}
    critic_params = {k: v.detach().clone() for k, v in critic.backend.named_full_parameters()}
    gathered_adv = torch.cat(ctx.all_gather(adv))
    gathered_gae = torch.cat([t.flatten() for t in ctx.all_gather(torch.nn.functional.pad(
        gae_adv, (0, 8 - gae_adv.shape[1])))])
    torch.save({"initial": initial, "metrics": metrics, "critic_metrics": cmetrics, "actor": actor_params,
                "critic": critic_params, "advantages": gathered_adv, "gae": gathered_gae}, f"{out}.{ctx.rank}")
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
