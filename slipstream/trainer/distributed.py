"""SPMD process layout: one process per device, launched by torchrun (or alone, as one process).

Every rank runs the same RL loop on its own share of the prompts with its own rollout engine;
collectives exist only where the algorithm needs the global batch (advantage statistics, loss
normalisers, metrics) and inside the training backend. Nothing here is RPC: torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and torch.distributed do it all.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedSetupError(RuntimeError):
    """The process layout does not fit the configuration (e.g. a batch that cannot be split)."""


class CollectiveTimeoutError(RuntimeError):
    """A collective got no answer from the other ranks in time: one of them crashed, hangs or was stopped."""


# The backend's own timeout (gloo's, NCCL's watchdog) normally ends a stuck collective first, with
# its own message; the host-side deadline is the backstop for when it does not, a little later.
COLLECTIVE_GRACE_S = 2.0

# A rank that lost its connection to a dead peer waits this long before its error escapes, so that
# torchrun (which polls its workers every 0.1 s) sees the dead rank first and names it as the root
# cause, not the healthy rank's "connection reset" (torchrun orders failures by whole-second timestamps).
PEER_LOST_WAIT_S = 3.0
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "remote process exited")


def peer_lost(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says that another rank's process is gone."""
    seen = set()
    while error is not None and id(error) not in seen:
        if any(s in str(error) for s in _PEER_LOST):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def rank_entry_point(fn: Callable) -> Callable:
    """A torchrun entry point: torch elastic's `record` writes an escaping error and its traceback
    to torchrun's error file, so the launcher's summary names the failed rank; an error that only
    says a peer is gone (from any collective: ours or the training backend's) waits
    PEER_LOST_WAIT_S first, so that the rank that died is the one named."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if peer_lost(e):
                time.sleep(PEER_LOST_WAIT_S)
            raise

    return record(run)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float | None = None  # bounds every collective below; None waits as long as the backend does

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists (several ranks, or one rank of a sharded backend)."""
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, returned as a new tensor on t's device (t itself when not distributed)."""
        if not self.active or self.world_size == 1:
            return t
        out = t.detach().clone().to(self._comm_device())
        self._wait(dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True), "all_reduce (sum)")
        return out.to(t.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active or self.world_size == 1:
            return t
        out = t.detach().clone().to(self._comm_device())
        self._wait(dist.all_reduce(out, op=dist.ReduceOp.MAX, async_op=True), "all_reduce (max)")
        return out.to(t.device)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape on every rank), in rank order."""
        if not self.active or self.world_size == 1:
            return [t]
        src = t.detach().contiguous().to(self._comm_device())
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        self._wait(dist.all_gather(parts, src, async_op=True), "all_gather")
        return [p.to(t.device) for p in parts]

    def max_over_ranks(self, value: int) -> int:
        """The largest of the ranks' `value`s."""
        return int(self.all_reduce_max(torch.tensor([value], dtype=torch.long))[0])

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks (every rank passes the same keys and holds as many
        samples, so the mean of the ranks' means is the global mean)."""
        if not metrics or not self.active or self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        summed = self.all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, summed)}

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            self._wait(dist.barrier(async_op=True), "barrier")

    def _wait(self, work, what: str) -> None:
        """Wait for `work` on the host, at most timeout_s + COLLECTIVE_GRACE_S.

        The deadline is kept here, not only by the backend: NCCL's watchdog ends a timed-out job
        only after waiting for debug dumps, with SIGABRT and no error of ours; this raises one that
        names the rank and the operation. Polling waits for the GPU, which the callers do anyway to
        read the result on the host (all but PPO's advantage whitening, twice a step).
        """
        if self.timeout_s is not None:
            deadline = time.monotonic() + self.timeout_s + COLLECTIVE_GRACE_S
            while not work.is_completed():
                if time.monotonic() > deadline:
                    _abort_nccl()
                    atexit.register(_exit_skipping_teardown)
                    raise CollectiveTimeoutError(
                        f"rank {self.rank}: {what} got no answer from the other ranks within "
                        f"{self.timeout_s:g} s (trainer.dist_timeout_s): a rank crashed, hangs or was stopped; "
                        f"the other ranks' logs say which")
                time.sleep(0.0002)
        try:
            work.wait()
        except Exception:  # the backend's own timeout, or a peer that died: nothing is left in flight
            _abort_nccl()
            raise

    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo moves CPU tensors only.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _abort_nccl() -> None:
    """Abort NCCL's communicators, so that its kernels in flight stop. Best effort: the error about
    to be raised is what matters. (gloo has no abort that does not wait for the operation.)"""
    if dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:
            pass


def _exit_skipping_teardown() -> None:
    """Registered when a collective is abandoned in flight: the interpreter's teardown would destroy
    the process group and so wait for that collective (gloo: until its own, longer timeout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# NCCL settings that decide how a job with a failing rank ends; a value the user set is kept.
NCCL_FAILURE_DEFAULTS = {
    # Between a collective's timeout and ending the process, PyTorch's watchdog waits four times
    # this long for the ranks' debug dumps: 15 s by default, a minute in which the job does nothing.
    "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "2000",
    # Connect the peers when the communicator is made, while every rank is there, instead of inside
    # the first collective that uses them: that connecting blocks the calling thread, with no
    # timeout and before the watchdog sees any work, so a rank that never reached its first
    # collective kept the others waiting for good (2 H200s: rank 0's first all-reduce never returned).
    "NCCL_RUNTIME_CONNECT": "0",
}
# the dump wait's older name
NCCL_ALIASES = {"TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": ("TORCH_FR_WAIT_TIMEOUT_DUMP_MILSEC",)}


def set_nccl_failure_defaults(environ=os.environ) -> None:
    """Read when the process group is created, so this runs before."""
    for name, value in NCCL_FAILURE_DEFAULTS.items():
        if not any(v in environ for v in (name, *NCCL_ALIASES.get(name, ()))):
            environ[name] = value


def init_distributed(device_name: str, timeout_s: float, need_group: bool) -> DistContext:
    """Join the job torchrun started (or start a one-process group when `need_group`).

    The process group uses NCCL on CUDA and gloo on CPU, with `timeout_s` on every collective,
    so a rank that stops answering ends the job with a timeout error instead of a hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise DistributedSetupError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto "
                                    "or cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices "
                                        f"are visible: launch at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if (world > 1 or need_group) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            set_nccl_failure_defaults()
        timeout = datetime.timedelta(seconds=timeout_s)
        if launched_by_torchrun():
            dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
        else:  # one process, no launcher: a private in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, timeout_s=timeout_s)
    # One collective now, while every rank is here: NCCL makes its communicator at the first one
    # where it has not already, and a rank that hangs before the first collective of the run must
    # leave the others in one that can time out, not in the making of a communicator.
    ctx.barrier()
    return ctx


def shutdown_distributed() -> None:
    """Leave the job together: a barrier, then every process group destroyed.

    The barrier keeps a rank from tearing down its connections while a peer still has a
    collective in flight, so the ranks leave at the same point instead of the first one
    finalizing its interpreter while the others still talk to it. (gloo's worker threads may
    still outlive this call: the backends' wrappers keep references to the groups.)
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def shard_groups(items: list, ctx: DistContext) -> list:
    """This rank's contiguous share of a step's prompts: whole GRPO groups, never split.

    Every rank gets the same number of prompts, so every rank runs the same number of
    micro-batches (the sharded backends' collectives require it).
    """
    if len(items) % ctx.world_size:
        raise DistributedSetupError(f"trainer.prompts_per_step={len(items)} must be a multiple of the number of "
                                    f"ranks ({ctx.world_size}): every rank takes whole prompt groups")
    k = len(items) // ctx.world_size
    return items[ctx.rank * k : (ctx.rank + 1) * k]


def global_advantages(estimator: Callable[..., torch.Tensor], rewards: torch.Tensor, group_ids: torch.Tensor,
                      ctx: DistContext, **kwargs) -> torch.Tensor:
    """Run a per-sequence estimator on the global batch and return this rank's rows.

    Group estimators (GRPO, RLOO) see the same groups as on one process since groups never
    span ranks; batch estimators (REINFORCE++) get the global mean and std. Rewards are a few
    floats per sequence, so gathering them costs nothing next to a step.
    """
    if ctx.world_size == 1 or not ctx.active:
        return estimator(rewards, group_ids, **kwargs)
    # Local group ids are 0..G-1 on every rank: offset them so groups of different ranks stay apart.
    offset = int(ctx.all_reduce_max(group_ids.max().reshape(1).to(torch.long))[0]) + 1
    all_rewards = torch.cat(ctx.all_gather(rewards.float()))
    all_groups = torch.cat([g + r * offset for r, g in enumerate(ctx.all_gather(group_ids.long()))])
    adv = estimator(all_rewards, all_groups, **kwargs)
    n = rewards.shape[0]
    return adv[ctx.rank * n : (ctx.rank + 1) * n]


def global_metrics(ctx: DistContext, completions, rewards: list[float], batch, mixed_groups: float,
                   t_rollout: float, t_update: float) -> tuple[dict[str, float], list[int], list[float]]:
    """A step's rollout metrics over every rank's samples; also every rank's lengths and rewards.

    Every rank holds the same number of samples, so gathering them is one fixed-size collective.
    Throughputs divide by the slowest rank's time: the step waits for it. How much longer the
    slowest rank's rollout took than the ranks' mean is logged too: the long tail of one rank's
    samples, not the cost of running on several GPUs.
    """
    local = torch.tensor([[len(c.tokens), r, float(c.finish_reason == "length")]
                          for c, r in zip(completions, rewards)], dtype=torch.float64)
    rows = torch.cat(ctx.all_gather(local))
    lengths, rew, truncated = rows[:, 0], rows[:, 1], rows[:, 2]
    sums = ctx.all_reduce_sum(torch.tensor([mixed_groups, float(batch.attention_mask.sum()), t_rollout],
                                           dtype=torch.float64))
    slowest = ctx.all_reduce_max(torch.tensor([t_rollout, t_update], dtype=torch.float64))
    total = float(lengths.sum())
    metrics = {
        "reward/mean": float(rew.mean()), "reward/std": float(rew.std()) if rew.numel() > 1 else 0.0,
        "reward/mixed_groups": float(sums[0]) / ctx.world_size,
        "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response/truncated_frac": float(truncated.mean()),
        "tokens/generated": total,
        "tokens/trained": float(sums[1]),
        "throughput/rollout_tokens_per_s": total / max(float(slowest[0]), 1e-9),
        "throughput/rollout_tokens_per_s_per_gpu": total / max(float(slowest[0]), 1e-9) / ctx.world_size,
        # prompt + response tokens through the trainer's forward and backward
        "throughput/train_tokens_per_s_per_gpu": float(sums[1]) / max(float(slowest[1]), 1e-9) / ctx.world_size,
        "time/rollout_slowest": float(slowest[0]),
        "time/update_slowest": float(slowest[1]),
        "time/rollout_slowest_over_mean": float(slowest[0]) / max(float(sums[2]) / ctx.world_size, 1e-9),
    }
    return metrics, [int(x) for x in lengths.tolist()], rew.tolist()


class _SilentLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's files)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, *args, **kwargs) -> None: ...

    def log_rollouts(self, *args, **kwargs) -> None: ...

    def truncate_after(self, *args, **kwargs) -> None: ...


def rank_zero_logger(ctx: DistContext, make: Callable):
    return make() if ctx.is_main else _SilentLogger()
