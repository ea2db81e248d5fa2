"""Training backends behind one face: `local` (one process), `fsdp2`, `deepspeed` (ZeRO 1/2/3).

`build_backend(...)` wraps a module (actor, critic or frozen reference) and, for trainable
modules, its optimizer. The RL code only calls the `TrainBackend` methods, so the actor's and
the critic's updates are the same code on every backend.
"""

from __future__ import annotations

from slipstream.trainer.backends.base import BackendError, OptimizerSpec, TrainBackend


def build_backend(kind: str, module, ctx, optim: OptimizerSpec | None, *, zero_stage: int = 2,
                  cpu_offload: bool = False, autocast: bool | None = None,
                  reshard_after_forward: bool = True, fsdp_min_unit_params: int = 0) -> TrainBackend:
    """`optim=None` wraps a frozen module (the reference): no gradients, no optimizer state.
    `autocast` (DeepSpeed; default: on CUDA) runs its forward passes under bf16 autocast.
    `reshard_after_forward` (FSDP2, trainable modules) frees gathered layers between forward and backward;
    `fsdp_min_unit_params` (FSDP2) groups consecutive layers into units of at least that many parameters."""
    if kind == "local":
        from slipstream.trainer.backends.local import LocalBackend

        return LocalBackend(module, ctx, optim)
    if kind == "fsdp2":
        from slipstream.trainer.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(module, ctx, optim, reshard_after_forward=reshard_after_forward,
                            min_unit_params=fsdp_min_unit_params)
    if kind == "deepspeed":
        from slipstream.trainer.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(module, ctx, optim, zero_stage=zero_stage, cpu_offload=cpu_offload,
                                autocast=autocast)
    raise BackendError(f"trainer.backend={kind!r} is not valid; choose one of: local, fsdp2, deepspeed")


__all__ = ["BackendError", "OptimizerSpec", "TrainBackend", "build_backend"]
