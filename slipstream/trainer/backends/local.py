"""`trainer.backend=local`: the module and its AdamW optimizer in one process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from slipstream.trainer.backends.base import (
    BackendError,
    OptimizerSpec,
    TrainBackend,
    build_adamw,
    clipped_step,
    fsync_tree,
    move_optimizer_state,
    set_lr,
    write_format,
)


class LocalBackend(TrainBackend):
    format = "torch"

    def __init__(self, module: torch.nn.Module, ctx, optim: OptimizerSpec | None):
        if ctx.world_size > 1:
            raise BackendError(f"trainer.backend=local trains in one process, but {ctx.world_size} ranks were "
                               f"launched; use trainer.backend=fsdp2 or deepspeed under torchrun")
        self.ctx = ctx
        self.module = module
        self.trainable = optim is not None
        self.optimizer = None
        self.max_grad_norm = optim.max_grad_norm if optim is not None else 0.0
        if optim is not None:
            self.optimizer = build_adamw(module, optim)
        else:
            module.requires_grad_(False).eval()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        return clipped_step(self.module, self.optimizer, self.max_grad_norm)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def named_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.module.named_parameters()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), directory / "model.pt")
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        write_format(directory, self.format, self.ctx.rank)
        fsync_tree(directory)

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu",
                                                      weights_only=True))

    def offload_optimizer(self) -> None:
        if self.optimizer is not None and self.ctx.device.type == "cuda":
            move_optimizer_state(self.optimizer, torch.device("cpu"))

    def reload_optimizer(self) -> None:
        if self.optimizer is not None and self.ctx.device.type == "cuda":
            move_optimizer_state(self.optimizer, self.ctx.device)
