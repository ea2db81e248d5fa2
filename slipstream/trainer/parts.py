"""What a run trains, built on the configured backend: the actor, its frozen reference, PPO's critic."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

from slipstream.config import SlipstreamConfig
from slipstream.trainer.actor import Actor
from slipstream.trainer.algorithms import CRITIC_ADVANTAGES
from slipstream.trainer.backends import OptimizerSpec, TrainBackend, build_backend
from slipstream.trainer.critic import Critic, ValueModel
from slipstream.trainer.distributed import DistContext


@dataclass
class TrainParts:
    actor: Actor
    critic: Critic | None

    @property
    def checkpointed(self) -> dict[str, TrainBackend]:
        """The trained backends, by the name of their checkpoint directory."""
        out = {"actor": self.actor.backend}
        if self.critic is not None:
            out["critic"] = self.critic.backend
        return out

    @contextlib.contextmanager
    def generating(self, engine, colocate: bool):
        """While the engine generates, the optimizer state is off the GPU and the KV cache is
        allocated; afterwards the cache is freed and the optimizer state returns (`colocate`)."""
        if not colocate:
            yield
            return
        for backend in self.checkpointed.values():
            backend.offload_optimizer()
        engine.restore_cache()
        try:
            yield
        finally:
            engine.release_cache()
            for backend in self.checkpointed.values():
                backend.reload_optimizer()


def build_parts(cfg: SlipstreamConfig, model, ctx: DistContext) -> TrainParts:
    """Wrap `model` (the full, unsharded policy) and its copies in the configured backend."""
    tc, ac = cfg.trainer, cfg.algorithm
    # The reference and the critic start from the initial policy: copy it before it is sharded.
    ref_module = copy.deepcopy(model) if ac.kl_coef > 0 else None
    critic_module = ValueModel.from_policy(model) if ac.advantage in CRITIC_ADVANTAGES else None

    def wrap(module, optim: OptimizerSpec | None) -> TrainBackend:
        return build_backend(tc.backend, module, ctx, optim, zero_stage=tc.zero_stage, cpu_offload=tc.cpu_offload,
                             reshard_after_forward=tc.reshard_after_forward,
                             fsdp_min_unit_params=tc.fsdp_min_unit_params)

    actor_backend = wrap(model, OptimizerSpec(tc.lr, tuple(tc.betas), tc.weight_decay, tc.max_grad_norm))
    ref = wrap(ref_module, None) if ref_module is not None else None
    actor = Actor(actor_backend, tc, ac, ctx, ref=ref, temperature=cfg.rollout.temperature)
    critic = None
    if critic_module is not None:
        critic_backend = wrap(critic_module.to(ctx.device),
                              OptimizerSpec(ac.critic_lr, tuple(tc.betas), tc.weight_decay, tc.max_grad_norm))
        critic = Critic(critic_backend, tc, ac, ctx)
    return TrainParts(actor=actor, critic=critic)
