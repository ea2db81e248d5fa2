"""`trainer.backend=local`: the module and its AdamW optimizer in one process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from slipstream.trainer.backends.base import (
    BackendError,
    OptimizerSpec,
    TrainBackend,
    check_finite_norm,
    fsync_tree,
    move_optimizer_state,
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
            self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=optim.lr,
                                               betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        else:
            module.requires_grad_(False).eval()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        try:
            value = check_finite_norm(norm)
        except FloatingPointError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

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
