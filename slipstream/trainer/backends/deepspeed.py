"""`trainer.backend=deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3, optionally with CPU optimizer offload.

Stage 1 shards the AdamW state across ranks, stage 2 also the gradients, stage 3 also the
parameters (gathered layer by layer in the forward pass and for the engine's weight sync). The
micro-batch accumulation is slipstream's own: every loss is already normalised by the global
batch, so DeepSpeed runs with one "micro-batch" per step and `last` marks the accumulation
boundary where it reduces the gradients.

Mixed precision (on CUDA) is torch autocast over float32 parameters, as in the other backends,
not DeepSpeed's bf16 mode. That mode rounds the parameters to bf16 and copies the fp32 master
weights from them, so every master weight starts on the bf16 grid and the weights the forward
pass and the rollout engine see stay put until an update has moved the master by half a bf16
step (0.2-0.4% of the weight): at RL learning rates (1e-6 to 1e-5 per step) the policy barely
moved for its first ~10 steps. Gradients are reduced in float32, as FSDP2 reduces them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from slipstream.trainer.backends.base import (
    BackendError,
    OptimizerSpec,
    TrainBackend,
    build_adamw,
    check_finite_norm,
    set_lr,
    sharding_units,
    unit_parameter_names,
    write_format,
)

CHECKPOINT_TAG = "zero"  # DeepSpeed's sub-directory of a checkpoint


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise BackendError("trainer.backend=deepspeed needs the deepspeed package: pip install "
                           f"'slipstream[deepspeed]' (import failed: {e})") from None
    return deepspeed


class DeepSpeedBackend(TrainBackend):
    format = "deepspeed"

    def __init__(self, module: torch.nn.Module, ctx, optim: OptimizerSpec | None, *, zero_stage: int = 2,
                 cpu_offload: bool = False, autocast: bool | None = None):
        if zero_stage not in (1, 2, 3):
            raise BackendError(f"trainer.zero_stage={zero_stage} is not valid; choose one of: 1, 2, 3")
        if not ctx.active:
            raise BackendError("trainer.backend=deepspeed needs a process group (init_distributed was not called)")
        self.ds = _import_deepspeed()
        if ctx.device.type == "cpu":
            # DeepSpeed's shared-memory CPU all-reduce (an optimisation for CPU inference) now and
            # then aborts a rank at exit ("terminate called without an active exception"); gloo's
            # collectives serve CPU runs.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # DeepSpeed reads its device from LOCAL_RANK, which only launchers set; a one-process run
        # (`slipstream train trainer.backend=deepspeed`) has none.
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        self.ctx, self.zero_stage, self.cpu_offload = ctx, zero_stage, cpu_offload
        self.trainable = optim is not None
        module.to(ctx.device)
        # ZeRO-3's weight sync gathers one decoder layer at a time, then the rest
        self._gather_groups = unit_parameter_names(module, sharding_units(module)) if zero_stage == 3 else []
        cuda = ctx.device.type == "cuda"
        autocast = cuda if autocast is None else autocast  # bf16 compute; CPU runs stay float32
        zero: dict = {"stage": zero_stage}
        if cpu_offload and self.trainable:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "bf16": {"enabled": False},
            # an empty module list: no gradient is reduced in bf16
            "torch_autocast": {"enabled": autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []},
            "gradient_clipping": optim.max_grad_norm if optim is not None else 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if not self.trainable:
            module.requires_grad_(False).eval()
            if zero_stage < 3:  # stages 1 and 2 shard only training state: a frozen module is a plain replica
                self.engine, self.optimizer, self.module, self.inner = None, None, module, module
                return
            config["zero_optimization"] = {"stage": 3}
            self.engine = self.ds.initialize(model=module, config=config)[0]
            self.optimizer, self.module, self.inner = None, self.engine, self.engine.module
            return
        if cpu_offload and cuda:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            params = [p for p in module.parameters() if p.requires_grad]
            opt = DeepSpeedCPUAdam(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                   adamw_mode=True)
        else:
            opt = build_adamw(module, optim)
        self.engine, self.optimizer, _, _ = self.ds.initialize(model=module, optimizer=opt, config=config)
        # Forward passes go through the engine: it keeps ZeRO's per-micro-batch bookkeeping (the
        # accumulation counters advance at each forward); the wrapped module keeps the parameter names.
        self.module, self.inner = self.engine, self.engine.module

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()  # clips to `max_grad_norm` (DeepSpeed's gradient_clipping) and steps
        norm = self.engine.get_global_grad_norm()  # the norm before clipping
        self.engine.zero_grad()
        try:
            return check_finite_norm(torch.as_tensor(norm))
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; DeepSpeed has already applied that step") from None

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer, lr)

    def named_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stages 1 and 2: the parameters themselves (every rank holds them). ZeRO-3 keeps a shard
        per rank: one decoder layer (then the rest) is gathered at a time, copied out and released."""
        with torch.no_grad():
            if self.zero_stage != 3:
                yield from self.inner.named_parameters()
                return
            for names in self._gather_groups:
                params = [self.inner.get_parameter(n) for n in names]
                with self.ds.zero.GatheredParameters(params, modifier_rank=None):
                    copies = [p.detach().clone() for p in params]
                yield from zip(names, copies)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        write_format(directory, self.format, self.ctx.rank)

    def load(self, directory: Path) -> None:
        if self.engine is None:
            return
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise BackendError(f"no DeepSpeed checkpoint under {directory}")

    def _moves_states(self) -> bool:
        # With ZeRO-Offload the optimizer state already lives on the CPU.
        return self.trainable and self.ctx.device.type == "cuda" and not self.cpu_offload

    def offload_optimizer(self) -> None:
        if self._moves_states():
            self.engine.offload_states()  # optimizer state, master weights and gradient buffers

    def reload_optimizer(self) -> None:
        if self._moves_states():
            self.engine.reload_states()
