"""The face every training backend implements, and what the backends share."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

FORMAT_FILE = "format.json"


class BackendError(RuntimeError):
    """A backend cannot be used as configured (missing package, unsupported combination)."""


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW hyper-parameters; the learning rate is set every step by `set_lr`."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # the global gradient norm is clipped to this before each step


class TrainBackend(ABC):
    """One module (and, when trainable, its optimizer) trained the backend's way.

    Every method that communicates must be called by every rank in the same order.
    """

    module: torch.nn.Module  # call this for forward passes
    trainable: bool
    format: str  # checkpoint layout written by `save`: torch | dcp | deepspeed

    @abstractmethod
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of `loss`; `last` marks the final micro-batch before `step`."""

    @abstractmethod
    def step(self) -> float:
        """Clip the global gradient norm to `max_grad_norm`, apply one optimizer step, clear the gradients.

        Returns the norm before clipping. A non-finite norm raises FloatingPointError.
        """

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @abstractmethod
    def named_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one parameter at a time, gathered from the shards on every rank.

        Names are the module's own (Hugging Face names for the actor); a gathered tensor is only
        valid until the next one is requested.
        """

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model and optimizer state into `directory` (every rank calls; shards in parallel)."""

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    def offload_optimizer(self) -> None:
        """Free accelerator memory held by optimizer state until `reload_optimizer` (rollout time)."""

    def reload_optimizer(self) -> None: ...

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def sharding_units(module: torch.nn.Module, min_params: int = 0) -> list[list[torch.nn.Module]]:
    """The repeated blocks of a model (the members of each `ModuleList`: HF decoders keep their
    layers in one), consecutive ones grouped until a group holds `min_params` parameters; a
    remainder short of it joins the group before it. Each group's weights are gathered only while
    its layers run, in one collective."""
    units = []
    for m in module.modules():
        if not isinstance(m, torch.nn.ModuleList):
            continue
        groups, size = [[]], 0
        for layer in m:
            if size >= max(min_params, 1):
                groups.append([])
                size = 0
            groups[-1].append(layer)
            size += sum(p.numel() for p in layer.parameters())
        if len(groups) > 1 and size < min_params:
            groups[-2].extend(groups.pop())
        units.extend(g for g in groups if g)
    return units


def unit_parameter_names(module: torch.nn.Module, units: list[list[torch.nn.Module]]) -> list[list[str]]:
    """The names of each unit's parameters (as `module.named_parameters()` gives them, tied
    weights once), then those of no unit: the groups a weight sync gathers one at a time."""
    prefix = {id(m): n for n, m in module.named_modules()}
    names = [n for n, _ in module.named_parameters()]
    groups = []
    for unit in units:
        heads = tuple(prefix[id(m)] + "." for m in unit)
        groups.append([n for n in names if n.startswith(heads)])
    grouped = {n for group in groups for n in group}
    groups.append([n for n in names if n not in grouped])
    return groups


def write_format(directory: Path, fmt: str, rank: int) -> None:
    if rank == 0:
        with open(directory / FORMAT_FILE, "w") as f:
            json.dump({"format": fmt}, f)
            f.flush()
            os.fsync(f.fileno())


def read_format(directory: Path) -> str:
    try:
        return json.loads((directory / FORMAT_FILE).read_text())["format"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise BackendError(f"{directory} does not say which backend wrote it ({FORMAT_FILE}): {e}") from None


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory` (the shards this process wrote, and the others': cheap)."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device != device and key != "step":
                state[key] = value.to(device, non_blocking=True)


def build_adamw(module: torch.nn.Module, optim: OptimizerSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=optim.lr,
                             betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def clipped_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """`TrainBackend.step` for a torch optimizer over `module`'s (possibly sharded) gradients."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
    if isinstance(norm, DTensor):  # sharded gradients: the norm over every rank's shards
        norm = norm.full_tensor()
    try:
        value = check_finite_norm(norm)
    except FloatingPointError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite_norm(norm: torch.Tensor) -> float:
    value = float(norm)
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"non-finite gradient norm ({value})")
    return value
