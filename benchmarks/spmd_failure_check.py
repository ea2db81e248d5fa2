"""A failing rank ends a multi-GPU job (NCCL) with its name and error, never a hang.

The CPU tests check this with gloo; NCCL behaves differently (collectives run on the GPU, a dead
peer leaves the others spinning in a kernel), so this runs the same failures on 2 GPUs:

    python3 benchmarks/spmd_failure_check.py --out benchmarks/results/spmd_failure_check.txt

(hydra-core and omegaconf on PYTHONPATH; about two minutes.) Cases:
- `raise` / `die` / `hang`: rank 1 of a bare two-rank job raises, is SIGKILLed, or stops answering
  while rank 0 waits in an NCCL all-reduce (5 s collective timeout);
- `train-kill`: a real `slipstream.train` run (smoke recipe on CUDA, fsdp2) whose rank 1 is
  SIGKILLed once step 2 is logged;
- `train-stop`: the same run with rank 1 SIGSTOPped (alive, silent) and a 10 s collective timeout.
Each must end non-zero, within 60 s of the failure (the timeout plus 60 s for `train-stop`),
and name the failing rank (or, for a silent rank, the one whose collective timed out).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scaling import child_env, descendants, kill_job, torchrun  # noqa: E402

FAILING_RANK = ROOT / "tests" / "trainer" / "spmd" / "failing_rank.py"


def _env() -> dict:
    # a rank killed by SIGABRT (or a timed-out job ended so) prints where every thread was
    return dict(child_env(), PYTHONFAULTHANDLER="1")


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for pid in descendants(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            return pid
    return None


def _failed_rank(log: str) -> str | None:
    if "Root Cause" not in log:
        return None
    m = re.search(r"rank\s*:\s*(\d+) \(local_rank", log[log.index("Root Cause"):])
    return m.group(1) if m else None


def bare(mode: str, device: str) -> dict:
    t0 = time.time()
    # its own session: a job that hangs is killed whole, ranks included (a rank left spinning in an
    # NCCL kernel would hold its GPU for whatever runs next)
    proc = subprocess.Popen(torchrun(2, [str(FAILING_RANK), mode, device]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=90)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        kill_job(proc, signal.SIGABRT, grace_s=3)  # faulthandler: where every thread was
        log, _ = proc.communicate()
        code = None
    # a silent rank: gloo's "Timed out", NCCL's watchdog "timeout", or slipstream's own deadline
    says = {"raise": "reward verifier crashed on rank one", "die": "Signal 9",
            "hang": r"timed out|timeout|CollectiveTimeoutError"}[mode]
    return {"case": mode, "returncode": code, "seconds": time.time() - t0, "limit_s": 60.0,
            "named_rank": _failed_rank(log), "expected_rank": "0" if mode == "hang" else "1",
            "error_named": re.search(says, log, re.I) is not None, "log": log}


def train(mode: str, workdir: Path, device: str) -> dict:
    run_dir = workdir / mode
    timeout_s = 10.0
    cmd = torchrun(2, ["-m", "slipstream.train", "recipe=smoke", f"trainer.device={device}", "trainer.backend=fsdp2",
                     "trainer.steps=100000", "trainer.save_every=0", "task.num_eval=0", "rollout=native",
                     "logger.wandb=false", f"trainer.dist_timeout_s={timeout_s}", f"trainer.run_dir={run_dir}"])
    log_file = workdir / f"{mode}.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and '"step": 2' in metrics.read_text():
                break
            time.sleep(0.5)
        victim = _rank_pid(proc.pid, 1) if proc.poll() is None else None
        if victim is None:  # the whole job: ranks left behind would hold the GPUs
            kill_job(proc, signal.SIGABRT, grace_s=3)  # faulthandler: where every thread was
            proc.wait()
            return {"case": mode, "error": "the run did not reach step 2 with rank 1 alive",
                    "log": log_file.read_text(errors="replace")}
        os.kill(victim, signal.SIGKILL if mode == "train-kill" else signal.SIGSTOP)
        t0 = time.time()
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            kill_job(proc, signal.SIGABRT, grace_s=3)  # faulthandler: where every thread was
            code = None
        elapsed = time.time() - t0
    if mode == "train-stop":  # whatever is left of the stopped rank (SIGKILL ends a stopped process too)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = log_file.read_text(errors="replace")
    return {"case": mode, "returncode": code, "seconds": elapsed,
            "limit_s": 60.0 + (timeout_s if mode == "train-stop" else 0.0), "named_rank": _failed_rank(log),
            "expected_rank": "1" if mode == "train-kill" else None,
            # the silent rank is named by the collective that timed out waiting for it
            "error_named": mode == "train-kill" or re.search(r"timed out|timeout", log, re.I) is not None, "log": log}


def verdict(r: dict) -> list[str]:
    if "error" in r:
        return [r["error"]]
    bad = []
    if r["returncode"] in (0, None):
        bad.append(f"return code {r['returncode']} (expected non-zero)")
    if r["seconds"] > r["limit_s"]:
        bad.append(f"took {r['seconds']:.1f} s (limit {r['limit_s']:.0f} s)")
    if r["named_rank"] is None:
        bad.append("no failed rank named in torchrun's error summary")
    elif r["expected_rank"] is not None and r["named_rank"] != r["expected_rank"]:
        bad.append(f"named rank {r['named_rank']}, expected {r['expected_rank']}")
    if not r["error_named"]:
        bad.append("the failing rank's error is not in the log")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="raise,die,hang,train-kill,train-stop")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, to try the script")
    p.add_argument("--out", default=None, help="write the report here too")
    p.add_argument("--logs", default=None, metavar="DIR", help="write each case's whole log here")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        raise SystemExit("needs 2 CUDA devices (--device cpu to try it with gloo)")
    name = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}" if args.device == "cuda" else "cpu (gloo)"
    lines = [f"device: {name}, torch {torch.__version__}, commit {os.environ.get('SLIPSTREAM_COMMIT')}"]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="slipstream-failure-") as tmp:
        for case in args.cases.split(","):
            r = bare(case, args.device) if case in ("raise", "die", "hang") else train(case, Path(tmp), args.device)
            bad = verdict(r)
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                (Path(args.logs) / f"{case}.log").write_text(r["log"])
            failures += bool(bad)
            root = r["log"][r["log"].find("Root Cause"):][:1500] if "Root Cause" in r["log"] else r["log"][-1500:]
            lines.append(f"\n== {case}: {'FAIL: ' + '; '.join(bad) if bad else 'ok'} "
                         f"(exit {r.get('returncode')}, {r.get('seconds', 0):.1f} s after the failure, "
                         f"named rank {r.get('named_rank')})\n{root.rstrip()}")
            print(lines[-1], flush=True)
    lines.append(f"\n{failures} failure(s)")
    print(lines[-1])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
