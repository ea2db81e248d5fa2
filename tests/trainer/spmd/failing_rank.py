"""A two-rank job in which rank 1 fails: `raise` (an exception), `die` (SIGKILL) or `hang` (stops answering).

`hang-host` is `hang` with the backend's own timeout far away (60 s), so that only slipstream's
host-side deadline on the collective (5 s) can end rank 0's wait.

Rank 0 meanwhile waits in a collective, as a healthy rank of a training step would: gloo on the
CPU (the tests), NCCL with `cuda` as the second argument (`benchmarks/spmd_failure_check.py`). The entry
point is wrapped like slipstream's own (`rank_entry_point`), so torchrun reports the failed rank's error.
"""

import dataclasses
import os
import signal
import sys
import time

import torch

from slipstream.trainer.distributed import init_distributed, rank_entry_point


@rank_entry_point
def main(mode: str, device: str) -> None:
    ctx = init_distributed(device, timeout_s=60 if mode == "hang-host" else 5, need_group=True)
    if mode == "hang-host":
        ctx = dataclasses.replace(ctx, timeout_s=5)
    if ctx.rank == 1:
        if mode == "raise":
            raise RuntimeError("reward verifier crashed on rank one")
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode in ("hang", "hang-host"):
            time.sleep(600)
    ctx.all_reduce_sum(torch.ones(1))  # rank 0: blocks until rank 1 answers, fails, or the timeout


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
