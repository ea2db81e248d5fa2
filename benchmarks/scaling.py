"""Weak scaling of the SPMD RL step: 1, 2, 4 ranks, per training backend, per model.

    python benchmarks/scaling.py --commit $(git rev-parse HEAD)                     # GPUs: 1,2,4 x fsdp2,deepspeed
    python benchmarks/scaling.py --models smollm2 --backends fsdp2 --gpus 1,2 --steps 4
    python benchmarks/scaling.py --device cpu --models tiny --gpus 1,2 --steps 3     # a dry run with gloo

Each configuration is one `torchrun --nproc_per_node=N -m slipstream.train` run of a recipe with
the per-rank batch held constant (`trainer.prompts_per_step = prompts_per_rank * N`: weak
scaling), checkpoints and evaluation off. From the run's metrics.jsonl, averaged over the steps
after the first (warm-up: allocation, first compilation), it reports the step time, rollout
tokens/s per GPU (generated tokens over the slowest rank's rollout time), training tokens/s per
GPU (prompt + response tokens through forward and backward over the slowest rank's update time)
and the weight sync time into the engine. Efficiency is the per-GPU throughput at N ranks over
the one at 1 rank of the same backend and model (target >= 0.85 at 4).

Models: `smollm2` (the smollm2-gpu recipe on SmolLM2-135M-Instruct), `qwen1.5b` (random weights in
the shape of Qwen2.5-1.5B with a byte tokenizer: responses run to max_tokens, so every rank
generates the same number of tokens), `tiny` (the smoke recipe's model, for dry runs). Writes
benchmarks/results/scaling.json (or --out) with the device, versions and commit; the GPU machine
has no .git, so pass --commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (recipe, extra overrides); `{model_dir}` is filled for models built by this script.
# The KV cache holds a rank's whole batch (no preemption noise in the rollout time).
MODELS = {
    "smollm2": ("smollm2-gpu", ["rollout.max_tokens=256", "rollout.n=8", "rollout.kv_cache_gb=8"]),
    "qwen1.5b": ("smollm2-gpu", ["model.name={model_dir}", "rollout.max_tokens=256", "rollout.n=8",
                                 "rollout.kv_cache_gb=8", "trainer.micro_batch_size=16",
                                 "model.gradient_checkpointing=true"]),
    "tiny": ("smoke", ["rollout.max_tokens=16"]),
}
# Qwen2.5-1.5B: hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
QWEN_1_5B = (1536, 28, 12, 2, 8960, 151936, True)

KEYS = {"step_s": "time/step", "rollout_tokens_per_s_per_gpu": "throughput/rollout_tokens_per_s_per_gpu",
        "train_tokens_per_s_per_gpu": "throughput/train_tokens_per_s_per_gpu", "sync_s": "time/sync",
        "rollout_s": "time/rollout", "update_s": "time/update"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--gpus", type=ints, default=[1, 2, 4], help="ranks per run (one GPU each)")
    p.add_argument("--backends", type=names, default=["fsdp2", "deepspeed"], help="fsdp2, deepspeed")
    p.add_argument("--zero-stage", type=int, default=2, help="deepspeed ZeRO stage")
    p.add_argument("--models", type=names, default=["smollm2", "qwen1.5b"], help=", ".join(MODELS))
    p.add_argument("--prompts-per-rank", type=int, default=16, help="prompts (GRPO groups) per rank and step")
    p.add_argument("--steps", type=int, default=4, help="RL steps per run; the first is warm-up")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, for a dry run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--commit", default=os.environ.get("SLIPSTREAM_COMMIT"), help="commit being measured")
    p.add_argument("--workdir", default=None, help="run directories and built models (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    return p.parse_args(argv)


def build_qwen_shape(path: Path) -> Path:
    """Random bf16 weights in Qwen2.5-1.5B's shape and the byte tokenizer, as a model directory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slipstream.models.tiny import build_tiny_tokenizer

    if (path / "config.json").is_file():
        return path
    h, layers, heads, kv, inter, vocab, tied = QWEN_1_5B
    cfg = Qwen2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    build_tiny_tokenizer().save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(model: str, backend: str, n: int, args, workdir: Path) -> dict:
    recipe, extra = MODELS[model]
    model_dir = build_qwen_shape(workdir / "qwen1.5b-shape") if model == "qwen1.5b" else None
    run_dir = workdir / f"{model}-{backend}-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"recipe={recipe}", f"trainer.backend={backend}", f"trainer.zero_stage={args.zero_stage}",
                 f"trainer.device={args.device}", f"trainer.run_dir={run_dir}", f"trainer.steps={args.steps}",
                 f"trainer.prompts_per_step={args.prompts_per_rank * n}", "trainer.save_every=0",
                 "trainer.eval_every=0", "task.num_eval=0", "trainer.resume=never", "logger.wandb=false",
                 "logger.progress=false", "rollout=native",
                 *(o.format(model_dir=model_dir) for o in extra), *args.overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
           "-m", "slipstream.train", *overrides]
    print(f"== {model} {backend} x{n}: {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    row = {"model": model, "backend": backend, "gpus": n, "wall_s": time.perf_counter() - t0,
           "prompts_per_step": args.prompts_per_rank * n}
    if p.returncode != 0:
        row["error"] = (p.stdout[-2000:] + p.stderr[-4000:]).strip()
        print(f"   failed (exit {p.returncode}):\n{row['error'][-1500:]}", flush=True)
        return row
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in steps if r["step"] >= 2] or [r for r in steps if r["step"] >= 1]
    for out_key, key in KEYS.items():
        row[out_key] = sum(r[key] for r in measured) / len(measured)
    row["response_length"] = sum(r["response_length/mean"] for r in measured) / len(measured)
    row["steps_measured"] = len(measured)
    print("   " + ", ".join(f"{k} {row[k]:.4g}" for k in KEYS), flush=True)
    return row


def add_efficiency(rows: list[dict]) -> None:
    """Per-GPU throughput at N ranks over that at 1 rank of the same model and backend."""
    base = {(r["model"], r["backend"]): r for r in rows if r["gpus"] == 1 and "error" not in r}
    for r in rows:
        b = base.get((r["model"], r["backend"]))
        if b is None or "error" in r:
            continue
        for key in ("rollout_tokens_per_s_per_gpu", "train_tokens_per_s_per_gpu"):
            r[f"{key}_efficiency"] = r[key] / b[key]
        # per-GPU work is constant, so the step time's ratio is the whole step's weak-scaling efficiency
        r["step_efficiency"] = b["step_s"] / r["step_s"]


def environment(device: str, commit: str | None) -> dict:
    import torch
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit,
            "python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        meta["deepspeed"] = None
    if device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        meta["gpus_visible"] = torch.cuda.device_count()
    else:
        meta["device"] = "cpu (gloo)"
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.gpus):
            raise SystemExit(f"--gpus up to {max(args.gpus)} needs that many CUDA devices "
                             f"(visible: {torch.cuda.device_count() if torch.cuda.is_available() else 0}); "
                             f"--device cpu for a dry run")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="slipstream-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [run_one(m, b, n, args, workdir) for m in args.models for b in args.backends for n in args.gpus]
    add_efficiency(rows)
    result = {"meta": {**environment(args.device, args.commit), "prompts_per_rank": args.prompts_per_rank,
                       "steps": args.steps, "zero_stage": args.zero_stage, "overrides": args.overrides},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'model':10s} {'backend':10s} {'gpus':>4s} {'step s':>8s} {'rollout tok/s/gpu':>18s} "
          f"{'train tok/s/gpu':>16s} {'sync s':>7s} {'eff':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:10s} {r['backend']:10s} {r['gpus']:4d} failed")
            continue
        eff = r.get("rollout_tokens_per_s_per_gpu_efficiency", float("nan"))
        print(f"{r['model']:10s} {r['backend']:10s} {r['gpus']:4d} {r['step_s']:8.3f} "
              f"{r['rollout_tokens_per_s_per_gpu']:18.1f} {r['train_tokens_per_s_per_gpu']:16.1f} "
              f"{r['sync_s']:7.3f} {eff:6.2f}")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
