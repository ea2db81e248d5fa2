"""Weak scaling of the SPMD RL step: 1, 2, 4 ranks, per training backend, per model.

On the 4-GPU machine (from the repository root; no network and no .git needed; hydra-core and
omegaconf on PYTHONPATH, e.g. `export PYTHONPATH=/tmp/site`; SmolLM2 converted to /tmp/smollm2-hf):

    python3 benchmarks/scaling.py --models smollm2,qwen1.5b --backends fsdp2 --gpus 1,2,4 --steps 4 \\
        --smollm2 /tmp/smollm2-hf --commit SHA

    (about 6 runs of 1-1.5 minutes each; add `deepspeed` to --backends where deepspeed is installed)

A dry run on the CPU (gloo, any machine):

    python benchmarks/scaling.py --device cpu --models tiny,qwen-tiny --gpus 1,2 --steps 2 --out /tmp/scaling.json

Each configuration is one `torchrun --nproc_per_node=N -m slipstream.train` run of a recipe with
the per-rank batch held constant (`trainer.prompts_per_step = prompts_per_rank * N`: weak
scaling; by default 16 prompts x 8 samples x up to 256 tokens per rank), evaluation off, under a
per-configuration timeout (`--timeout`; the whole process group is killed when it runs out). From
the run's metrics.jsonl, over the steps after the first (warm-up: allocation, CUDA graph
capture, kernel compilation), it reports the mean step time, rollout tokens/s per GPU (the steps'
generated tokens over the sum of the slowest rank's rollout times), training tokens/s per GPU
(prompt + response tokens through forward and backward over the slowest rank's update times) and the time of the weight sync into
the rollout engine (every rank gathers the full weights and loads them into its engine). Efficiency
is the per-GPU throughput at N ranks over the one at 1 rank of the same backend and model (target
>= 0.85 at 4 GPUs; weight sync < 1 s for 1.5B); the rollout's is also given as the ratio of its
times, which the answers' lengths do not move as much (a policy that learns from N times the batch
shortens its answers at another pace: add `trainer.lr=1e-30` to the overrides to hold every
configuration's policy fixed while running the same computation).

Models: `smollm2` (the smollm2-gpu recipe on SmolLM2-135M-Instruct, from `--smollm2 DIR` or the
model registry), `qwen1.5b` (random bf16 weights in the shape of Qwen2.5-1.5B with a byte
tokenizer, built once into the work directory: responses run to max_tokens, so every rank
generates the same number of tokens), `tiny` and `qwen-tiny` (the smoke recipe's model and a
Qwen2-architecture model of the same size, for dry runs).

`--profile-step N` records step N of every configuration with torch.profiler (`trainer.profile_steps`):
each rank's Chrome trace and operator table land in `<workdir>/<model>-<backend>-<N>/profile/`.

`--specs off,suffix` runs every configuration with each speculation setting, in one invocation
(one warm-up run); efficiencies compare runs of the same setting.

Under each configuration the table names the steps whose slowest rollout or update took 1.5x
its median, with what the rollout did once (graphs captured, projection shapes timed) and the
time in Python's garbage collector; the JSON keeps every step.

The JSON (`--out`, default benchmarks/results/scaling.json) is rewritten after every
configuration, so a run cut short keeps what it measured; a configuration that fails or times out
keeps its log tail and any steps it logged. A row whose GPUs already held other compute
processes when it started (nvidia-smi) names them in `foreign_gpu_processes`: its timings are
not comparable. The deepspeed backend is skipped, with a message, where
deepspeed cannot be imported. Each run's log is in the work directory (`--workdir`, default a
temporary directory); run checkpoints are deleted after each configuration (a 1.5B model's
optimizer state is 18 GB).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PER_RANK = ["rollout.max_tokens=256", "rollout.n=8"]
# name -> (recipe, extra overrides); `{model_dir}` is filled for models built by this script and
# for `--smollm2`. The KV cache holds a rank's whole batch (no preemption noise in the rollout time).
MODELS = {
    "smollm2": ("smollm2-gpu", ["model.name={model_dir}", *PER_RANK, "rollout.kv_cache_gb=8"]),
    "qwen1.5b": ("smollm2-gpu", ["model.name={model_dir}", *PER_RANK, "rollout.kv_cache_gb=8",
                                 "trainer.micro_batch_size=16", "model.gradient_checkpointing=true"]),
    "tiny": ("smoke", ["rollout.max_tokens=16"]),
    "qwen-tiny": ("smoke", ["model.name={model_dir}", "rollout.max_tokens=16"]),
}
# hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
QWEN_SHAPES = {
    "qwen1.5b": (1536, 28, 12, 2, 8960, 151936, True),  # Qwen2.5-1.5B
    "qwen-tiny": (64, 2, 4, 2, 128, 1024, True),
}

# means over the measured steps
KEYS = {"step_s": "time/step", "sync_s": "time/sync", "rollout_s": "time/rollout", "update_s": "time/update",
        "rollout_slowest_s": "time/rollout_slowest", "update_slowest_s": "time/update_slowest",
        "rollout_slowest_over_mean": "time/rollout_slowest_over_mean", "response_length": "response_length/mean",
        # the longest answer of the step's global batch: what the slowest rank's rollout waits for
        "response_length_max": "response_length/max", "tokens_generated_per_step": "tokens/generated"}
# kept per step in the JSON, to tell a slow configuration from a few slow steps
STEP_KEYS = ["time/step", "time/rollout_slowest", "time/update_slowest", "time/sync", "tokens/generated",
             "tokens/trained", "response_length/mean", "response_length/max", "spec/drafted_tokens",
             "spec/accepted_tokens", "spec/time_spec_steps", "spec/time_plain_steps", "rollout/slowest_step_s",
             "rollout/graphs_captured", "rollout/kernel_timings", "rollout/gc_s", "time/gc",
             "memory/alloc_retries", "memory/cuda_mallocs", "memory/cuda_frees", "memory/peak_allocated_gb",
             "memory/reserved_gb"]
NEEDED = ["torch", "transformers", "safetensors", "omegaconf", "hydra"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--gpus", type=ints, default=[1, 2, 4], help="ranks per run (one GPU each)")
    p.add_argument("--backends", type=names, default=["fsdp2", "deepspeed"], help="fsdp2, deepspeed")
    p.add_argument("--zero-stage", type=int, default=2, help="deepspeed ZeRO stage")
    p.add_argument("--models", type=names, default=["smollm2", "qwen1.5b"], help=", ".join(MODELS))
    p.add_argument("--smollm2", default=None, metavar="DIR",
                   help="SmolLM2-135M-Instruct as a transformers directory (default: the registered model, "
                        "pulled on first use)")
    p.add_argument("--prompts-per-rank", type=int, default=16, help="prompts (GRPO groups) per rank and step")
    p.add_argument("--steps", type=int, default=4, help="RL steps per run; the first is warm-up")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, for a dry run")
    p.add_argument("--no-warmup-run", dest="warmup_run", action="store_false",
                   help="skip the unmeasured 1-rank run that first compiles the kernels")
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    p.add_argument("--specs", type=names, default=[], metavar="KINDS",
                   help="run every configuration once per speculation setting (e.g. off,suffix: `spec=KIND`); "
                        "default: the recipe's own")
    p.add_argument("--profile-step", type=int, default=0, metavar="N",
                   help="record step N of every run with torch.profiler (a trace and an operator table per rank "
                        "under the run's profile/ directory); that step is left out of the means")
    p.add_argument("--commit", default=os.environ.get("SLIPSTREAM_COMMIT"), help="commit being measured")
    p.add_argument("--workdir", default=None, help="run directories, logs and built models (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    return p.parse_args(argv)


def child_env() -> dict:
    """The runs import slipstream from this checkout, before whatever PYTHONPATH already holds."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT), PYTHONUNBUFFERED="1")


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def deepspeed_problem() -> str | None:
    """Why the deepspeed backend cannot run here (None: it can). Imported in a child process:
    importing deepspeed probes the machine, and a broken install fails there, not here."""
    p = subprocess.run([sys.executable, "-c", "import deepspeed"], env=child_env(), capture_output=True, text=True)
    if p.returncode == 0:
        return None
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"import deepspeed exited with {p.returncode}"


def build_qwen_shape(path: Path, shape: tuple, device: str) -> Path:
    """Random bf16 weights in a Qwen2 shape and the byte tokenizer, as a model directory (built once)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slipstream.models.tiny import build_tiny_tokenizer

    if (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    h, layers, heads, kv, inter, vocab, tied = shape
    cfg = Qwen2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    # initialised on the GPU where there is one (seconds instead of a minute for 1.5B), in bf16
    init_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(init_device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    n = sum(p.numel() for p in model.parameters())
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    build_tiny_tokenizer().save_pretrained(tmp)
    os.replace(tmp, path)
    del model
    if init_device == "cuda":
        torch.cuda.empty_cache()
    print(f"built {path.name}: {n / 1e9:.2f}B parameters (random, bf16) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str]) -> list[str]:
    """The command of a one-host torchrun job of `nproc` ranks running `args`, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", *args]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_job(proc: subprocess.Popen, first: signal.Signals = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """End a torchrun job and its ranks. torchrun starts the ranks in sessions of their own, so
    killing torchrun's process group alone leaves them holding their GPUs. The ranks get `first`,
    then, once torchrun has exited or `grace_s` has passed, everything left gets SIGKILL."""
    ranks = descendants(proc.pid)
    for pid in ranks:
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_steps(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return [r for r in rows if r.get("step", 0) >= 1 and "time/step" in r]


def summarize(row: dict, steps: list[dict], profiled: int = 0) -> None:
    """Means over the measured steps (after the first, warm-up, when there are more; not the
    `profiled` one, which the profiler slows)."""
    measured = [r for r in steps if r["step"] >= 2 and r["step"] != profiled] or steps
    row["steps_logged"] = len(steps)
    row["steps_measured"] = len(measured)
    if not measured:
        return
    for out_key, key in KEYS.items():
        row[out_key] = sum(r[key] for r in measured) / len(measured)
    row["sync_max_s"] = max(r["time/sync"] for r in measured)
    # Throughput is the measured steps' tokens over their time (the slowest rank's: the step waits
    # for it), not a mean of per-step rates, which a few quick steps would dominate.
    gpus = row["gpus"]
    row["rollout_tokens_per_s_per_gpu"] = (sum(r["tokens/generated"] for r in measured)
                                           / sum(r["time/rollout_slowest"] for r in measured) / gpus)
    row["train_tokens_per_s_per_gpu"] = (sum(r["tokens/trained"] for r in measured)
                                         / sum(r["time/update_slowest"] for r in measured) / gpus)
    row["steps"] = [{k: r[k] for k in ["step", *STEP_KEYS] if k in r} for r in steps]


def gpu_processes() -> list[str]:
    """Compute processes on the GPUs now (nvidia-smi), e.g. ranks of an earlier job that never
    exited: a run sharing a GPU with them measures nothing. Empty where nvidia-smi is missing."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if p.returncode != 0:
        return []
    # not this script's own process (it holds a CUDA context once it has built a model on the GPU)
    return [line.strip() for line in p.stdout.splitlines()
            if line.strip() and line.split(",")[1].strip() != str(os.getpid())]


def run_one(model: str, backend: str, n: int, args, workdir: Path, model_dirs: dict, spec: str | None = None) -> dict:
    recipe, extra = MODELS[model]
    name = f"{model}-{backend}-{n}" + (f"-spec-{spec}" if spec else "")
    run_dir = workdir / name
    log = workdir / f"{name}.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"recipe={recipe}", f"trainer.backend={backend}", f"trainer.zero_stage={args.zero_stage}",
                 f"trainer.device={args.device}", f"trainer.run_dir={run_dir}", f"trainer.steps={args.steps}",
                 f"trainer.prompts_per_step={args.prompts_per_rank * n}", "trainer.save_every=0",
                 "trainer.eval_every=0", "task.num_eval=0", "trainer.resume=never", "logger.wandb=false",
                 "logger.progress=false", "rollout=native",
                 *(o.format(model_dir=model_dirs.get(model)) for o in extra), *args.overrides]
    if spec:
        overrides.append(f"spec={spec}")
    if args.profile_step:
        overrides.append(f"trainer.profile_steps=[{args.profile_step}]")
    cmd = torchrun(n, ["-m", "slipstream.train", *overrides])
    print(f"== {model} {backend} x{n}{f' spec={spec}' if spec else ''} (log: {log})\n   {' '.join(overrides)}",
          flush=True)
    row = {"model": model, "backend": backend, "gpus": n, "spec": spec, "prompts_per_step": args.prompts_per_rank * n,
           "log": str(log)}
    if args.device == "cuda" and (busy := gpu_processes()):
        row["foreign_gpu_processes"] = busy
        print(f"   WARNING: other processes hold GPUs before this run; its timings are not comparable: {busy}",
              flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        # its own session: on timeout the whole group (torchrun and every rank) is killed
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            kill_job(proc)
            code = None
    row["wall_s"] = time.perf_counter() - t0
    summarize(row, _read_steps(run_dir), args.profile_step)
    if args.profile_step:
        row["profile_dir"] = str(run_dir / "profile")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if code is None and row["steps_logged"] >= args.steps:
        # every step is in metrics.jsonl: only the exit (final evaluation, report) ran past the limit
        row["exit_timed_out"] = f"every step logged, then timed out after {args.timeout:.0f} s while exiting"
        print(f"   {row['exit_timed_out']}", flush=True)
    elif code != 0:
        tail = log.read_text(errors="replace")[-4000:].strip()
        row["error"] = f"timed out after {args.timeout:.0f} s" if code is None else f"exit code {code}"
        row["log_tail"] = tail
        print(f"   {row['error']} ({row['steps_logged']} of {args.steps} steps logged); log tail:\n"
              + "\n".join("   | " + line for line in tail.splitlines()[-25:]), flush=True)
    if row.get("steps_measured"):
        print("   " + ", ".join(f"{k} {row[k]:.4g}" for k in (*KEYS, "sync_max_s")) + f", wall {row['wall_s']:.0f} s",
              flush=True)
    return row


def add_efficiency(rows: list[dict]) -> None:
    """Per-GPU throughput at N ranks over that at 1 rank of the same model, backend and speculation."""
    base = {(r["model"], r["backend"], r.get("spec")): r for r in rows
            if r["gpus"] == 1 and "step_s" in r and "error" not in r}
    for r in rows:
        b = base.get((r["model"], r["backend"], r.get("spec")))
        if b is None or "step_s" not in r:
            continue
        for key in ("rollout_tokens_per_s_per_gpu", "train_tokens_per_s_per_gpu"):
            r[f"{key}_efficiency"] = r[key] / b[key]
        # per-GPU work is constant, so the step time's ratio is the whole step's weak-scaling efficiency
        r["step_efficiency"] = b["step_s"] / r["step_s"]
        # The same for the rollout alone: unlike its tokens/s, not moved by how long the answers of
        # a policy that learned differently (from 4x the batch) have become.
        r["rollout_time_efficiency"] = b["rollout_slowest_s"] / r["rollout_slowest_s"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str, commit: str | None) -> dict:
    import torch

    meta = {"torch": torch.__version__, "transformers": _version("transformers"), "triton": _version("triton"),
            "deepspeed": _version("deepspeed"), "commit": commit, "python": sys.version.split()[0],
            "cpus": os.cpu_count()}
    if device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        meta["gpus_visible"] = torch.cuda.device_count()
    else:
        meta["device"] = "cpu (gloo)"
    return meta


def slow_steps(row: dict, factor: float = 1.5) -> list[str]:
    """Measured steps whose slowest rollout or update took `factor` times the configuration's
    median, with the rollout's one-time work (graphs captured, kernel shapes timed) and GC time."""
    steps = [s for s in row.get("steps", []) if s["step"] >= 2]
    out = []
    rollout_work = (("rollout/graphs_captured", "graphs"), ("rollout/kernel_timings", "timings"), ("rollout/gc_s", "gc s"))
    for key, what, work in (("time/rollout_slowest", "rollout", rollout_work),
                            ("time/update_slowest", "update", (("time/gc", "step gc s"),
                                                               ("memory/alloc_retries", "alloc retries"),
                                                               ("memory/cuda_mallocs", "cudaMallocs")))):
        times = sorted(s[key] for s in steps if key in s)
        if len(times) < 3:
            continue
        median = times[len(times) // 2]
        for s in steps:
            if s.get(key, 0.0) > factor * median:
                extra = "".join(f", {label} {s[k]:.3g}" for k, label in work if k in s)
                out.append(f"step {s['step']} {what} {s[key]:.2f} s (median {median:.2f}{extra})")
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'model':10s} {'spec':6s} {'backend':9s} {'gpus':>4s} {'step s':>8s} {'rollout tok/s/gpu':>17s} "
            f"{'train tok/s/gpu':>15s} {'sync s':>7s} {'eff rollout':>11s} {'(time)':>6s} {'eff train':>9s} "
            f"{'eff step':>8s} {'answer len':>10s}")
    lines = [head]
    for r in rows:
        lead = f"{r['model']:10s} {r.get('spec') or '-':6s} {r['backend']:9s} {r['gpus']:4d}"
        if "skipped" in r:
            lines.append(f"{lead} skipped: {r['skipped']}")
            continue
        if "step_s" not in r:
            lines.append(f"{lead} failed: {r.get('error', 'no step logged')}")
            continue

        def eff(key):
            return f"{r[key]:.2f}" if key in r else "-"

        note = f"  ({r['error']}, {r['steps_measured']} steps)" if "error" in r else ""
        if "exit_timed_out" in r:
            note += "  (timed out while exiting, every step logged)"
        if "foreign_gpu_processes" in r:
            note += "  (GPUs shared with other processes)"
        lines.append(f"{lead} {r['step_s']:8.3f} {r['rollout_tokens_per_s_per_gpu']:17.1f} "
                     f"{r['train_tokens_per_s_per_gpu']:15.1f} {r['sync_s']:7.3f} "
                     f"{eff('rollout_tokens_per_s_per_gpu_efficiency'):>11s} {eff('rollout_time_efficiency'):>6s} "
                     f"{eff('train_tokens_per_s_per_gpu_efficiency'):>9s} {eff('step_efficiency'):>8s} "
                     f"{r['response_length']:10.1f}{note}")
        lines += [f"{'':32s} slow {line}" for line in slow_steps(r)]
    return "\n".join(lines)


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    add_efficiency(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    bad = sorted(set(args.backends) - {"fsdp2", "deepspeed"})
    if bad:
        raise SystemExit(f"unknown backend(s) {bad}; choose from fsdp2, deepspeed")
    missing = missing_modules()
    if missing:
        raise SystemExit(f"missing Python packages: {', '.join(missing)} (hydra = hydra-core); put them on "
                         f"PYTHONPATH or pip install them")
    if args.smollm2 is not None and not (Path(args.smollm2) / "config.json").is_file():
        raise SystemExit(f"--smollm2 {args.smollm2}: not a transformers model directory (no config.json)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.gpus):
            raise SystemExit(f"--gpus up to {max(args.gpus)} needs that many CUDA devices "
                             f"(visible: {torch.cuda.device_count() if torch.cuda.is_available() else 0}); "
                             f"--device cpu for a dry run")
    skip = {}
    if "deepspeed" in args.backends:
        why = deepspeed_problem()
        if why is not None:
            skip["deepspeed"] = f"deepspeed cannot be imported here ({why})"
            print(f"NOTE: skipping the deepspeed backend: {skip['deepspeed']}; the other backends still run",
                  flush=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="slipstream-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    meta = {**environment(args.device, args.commit), "prompts_per_rank": args.prompts_per_rank,
            "steps": args.steps, "zero_stage": args.zero_stage, "timeout_s": args.timeout,
            "overrides": args.overrides, "argv": sys.argv[1:] if argv is None else list(argv)}
    model_dirs = {"smollm2": args.smollm2 or "smollm2-135m-instruct"}
    for m in args.models:
        if m in QWEN_SHAPES:
            model_dirs[m] = str(build_qwen_shape(workdir / f"{m}-shape", QWEN_SHAPES[m], args.device))
    rows: list[dict] = []
    t_start = time.perf_counter()
    if args.warmup_run:
        # A fresh machine compiles the Triton kernels during the first run, at every new batch size
        # and length, well past its first step: whichever configuration came first would be slowed.
        print("== warm-up run (compiles kernels; not measured)", flush=True)
        warm = argparse.Namespace(**{**vars(args), "steps": 3, "profile_step": 0})
        run_one(args.models[0], next((b for b in args.backends if b not in skip), "fsdp2"), 1, warm, workdir,
                model_dirs)
    for m in args.models:
        for spec in args.specs or [None]:
            for b in args.backends:
                for n in args.gpus:
                    if b in skip:
                        rows.append({"model": m, "backend": b, "gpus": n, "spec": spec, "skipped": skip[b]})
                    else:
                        rows.append(run_one(m, b, n, args, workdir, model_dirs, spec))
                    write(out, meta, rows)  # after every configuration: a cut-short run keeps what it measured
    print(f"\n{table(rows)}\n\nwrote {out} ({time.perf_counter() - t_start:.0f} s of runs; logs in {workdir})")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
