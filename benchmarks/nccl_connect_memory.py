"""What `NCCL_RUNTIME_CONNECT=0` (slipstream's default) costs: GPU memory and time at start-up.

With 0, NCCL connects every peer of a communicator when it is made; with 1 (NCCL's own default),
inside the first collective that needs the connection. Each setting runs a two-rank job on 2
GPUs that starts the process group as the trainer does (`init_distributed`, which ends with a
barrier), then runs the collectives a training step uses (all-reduce, all-gather, an object
broadcast, a large all-reduce like a gradient bucket). Each rank reports its device's used
memory outside torch's allocator after the CUDA context, after `init_distributed` and after those collectives:

    python3 benchmarks/nccl_connect_memory.py --out benchmarks/results/nccl_connect_memory.json --commit SHA
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scaling import child_env, environment, torchrun  # noqa: E402

MARK = "NCCL_MEMORY "


def _used_mib() -> float:
    """The device's used memory outside torch's allocator: the CUDA context and NCCL's buffers."""
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**20


def worker() -> None:
    import torch

    from slipstream.trainer.distributed import init_distributed, shutdown_distributed

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    torch.zeros(1, device="cuda")
    row = {"rank": int(os.environ["RANK"]), "runtime_connect": os.environ["NCCL_RUNTIME_CONNECT"],
           "context_mib": _used_mib()}
    t0 = time.perf_counter()
    ctx = init_distributed("cuda", 60.0, need_group=True)
    row["init_s"] = time.perf_counter() - t0
    row["after_init_mib"] = _used_mib()
    t0 = time.perf_counter()
    ctx.all_reduce_sum(torch.ones(8, device="cuda"))
    ctx.all_gather(torch.ones(8, device="cuda"))
    ctx.broadcast_object({"step": 1})
    ctx.all_reduce_sum(torch.ones(64 * 2**20 // 4, device="cuda"))  # 64 MiB, a gradient bucket's size
    row["first_collectives_s"] = time.perf_counter() - t0
    row["after_collectives_mib"] = _used_mib()
    print(MARK + json.dumps(row), flush=True)
    shutdown_distributed()


def run(runtime_connect: str) -> list[dict]:
    cmd = torchrun(2, [__file__, "--worker"])
    env = dict(child_env(), NCCL_RUNTIME_CONNECT=runtime_connect)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    rows = [json.loads(line[len(MARK):]) for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or len(rows) != 2:
        raise SystemExit(f"NCCL_RUNTIME_CONNECT={runtime_connect}: exit {out.returncode}\n{out.stdout[-3000:]}"
                         f"\n{out.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--commit", default=os.environ.get("SLIPSTREAM_COMMIT"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return 0
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 CUDA devices")
    rows = run("1") + run("0")
    print(f"{'RUNTIME_CONNECT':>15} {'rank':>4} {'context MiB':>11} {'after init':>10} {'after colls':>11} "
          f"{'init s':>6} {'colls s':>7}")
    for r in rows:
        print(f"{r['runtime_connect']:>15} {r['rank']:>4} {r['context_mib']:>11.0f} {r['after_init_mib']:>10.0f} "
              f"{r['after_collectives_mib']:>11.0f} {r['init_s']:>6.2f} {r['first_collectives_s']:>7.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": environment("cuda", args.commit), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
