"""`trainer.backend=fsdp2`: PyTorch FSDP2 (`fully_shard`), parameters sharded across ranks.

Consecutive decoder layers form one FSDP unit (gathered just before the first runs, freed after
the last; with `trainer.reshard_after_forward=false` a trainable model keeps it gathered until its
backward): one layer each by default, or as many as reach `trainer.fsdp_min_unit_params`, since a
small model's layers are too small for a collective each to pay. The embeddings, final norm and
head belong to the root unit. On CUDA, layers compute in bf16 and
gradients are reduced in fp32 while the sharded master weights and AdamW state stay fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from slipstream.trainer.backends.base import (
    BackendError,
    OptimizerSpec,
    TrainBackend,
    build_adamw,
    clipped_step,
    move_optimizer_state,
    set_lr,
    sharding_units,
    unit_parameter_names,
    write_format,
)


class FSDP2Backend(TrainBackend):
    format = "dcp"

    def __init__(self, module: torch.nn.Module, ctx, optim: OptimizerSpec | None, reshard_after_forward: bool = True,
                 min_unit_params: int = 0):
        if not ctx.active:
            raise BackendError("trainer.backend=fsdp2 needs a process group (init_distributed was not called)")
        self.ctx = ctx
        self.trainable = optim is not None
        module.to(ctx.device)
        if not self.trainable:
            module.requires_grad_(False).eval()
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if ctx.device.type == "cuda" else MixedPrecisionPolicy())
        # A frozen module has no backward to keep the gathered weights for.
        reshard = reshard_after_forward or not self.trainable
        self.units = sharding_units(module, min_unit_params)
        for unit in self.units:
            fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        self.module = module
        # the weight sync gathers unit by unit, the root's own parameters last
        self._gather_groups = list(zip([u[0] for u in self.units] + [module], unit_parameter_names(module, self.units)))
        self.optimizer = None
        self.max_grad_norm = optim.max_grad_norm if optim is not None else 0.0
        if optim is not None:
            self.optimizer = build_adamw(module, optim)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # Micro-batches before the last accumulate unsharded gradients locally; the last one
        # reduce-scatters the sum: one gradient collective per optimizer step, not per micro-batch.
        self.module.set_requires_gradient_sync(last)
        loss.backward()

    def step(self) -> float:
        return clipped_step(self.module, self.optimizer, self.max_grad_norm)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def named_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights, in the compute dtype (bf16 on CUDA), one FSDP unit at a time: one
        all-gather per unit (a gather per parameter cost SmolLM2's sync 0.13 s on 2 H200s against
        0.009 s for ZeRO-2, which holds full weights), and only one unit's weights are gathered
        at once; each tensor yielded is a copy, valid after the unit is freed again."""
        with torch.no_grad():
            for owner, names in self._gather_groups:
                owner.unshard()
                try:
                    for name in names:
                        p = self.module.get_parameter(name)
                        yield name, (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                finally:
                    owner.reshard()

    def _state(self) -> dict:
        if self.optimizer is None:
            return {"model": get_state_dict(self.module, [], options=StateDictOptions())[0]}
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=str(directory))
        write_format(directory, self.format, self.ctx.rank)

    def load(self, directory: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(directory))
        if self.optimizer is None:
            set_state_dict(self.module, [], model_state_dict=state["model"], optim_state_dict={})
        else:
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])

    def offload_optimizer(self) -> None:
        if self.optimizer is not None and self.ctx.device.type == "cuda":
            move_optimizer_state(self.optimizer, torch.device("cpu"))

    def reload_optimizer(self) -> None:
        if self.optimizer is not None and self.ctx.device.type == "cuda":
            move_optimizer_state(self.optimizer, self.ctx.device)
