"""`slipstream train|report|models|recipes`: the command line.

User mistakes (config, data files, model names, run directories) print one clear line and exit
with status 2, without a Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from slipstream.config import ConfigError
    from slipstream.models import ModelLoadError
    from slipstream.tasks import TaskDataError
    from slipstream.telemetry import ReportError
    from slipstream.trainer.checkpoint import CheckpointError
    from slipstream.trainer.backends import BackendError
    from slipstream.trainer.distributed import DistributedSetupError
    from slipstream.trainer.rewards import RewardModelError
    from slipstream.trainer.rl_loop import TrainingError

    return (ConfigError, ModelLoadError, TaskDataError, ReportError, CheckpointError, TrainingError, BackendError,
            DistributedSetupError, RewardModelError)


def cmd_train(overrides: list[str], print_config: bool) -> int:
    from omegaconf import OmegaConf

    from slipstream.config import compose

    cfg = compose(overrides)
    if print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    from slipstream.trainer.rl_loop import train

    train(cfg)
    return 0


def cmd_report(run_dir: str) -> int:
    from pathlib import Path

    from slipstream.telemetry import write_report

    for path in write_report(Path(run_dir)):
        print(path)
    return 0


def cmd_export(run_dir: str, out: str, step: int | None) -> int:
    from slipstream.trainer.export import export

    ckpt = export(Path(run_dir), Path(out), step)
    print(f"exported {ckpt} -> {out}")
    return 0


def cmd_models(action: str, name: str | None, force: bool) -> int:
    from slipstream.models import MODELS, ModelLoadError, pull

    if action == "list":
        for key, spec in MODELS.items():
            print(f"{key}: {getattr(spec, 'description', spec)}")
        return 0
    if not name:
        raise ModelLoadError(f"models pull needs a model name; registered: {', '.join(MODELS)}")
    if name not in MODELS:
        raise ModelLoadError(f"unknown model '{name}'; registered: {', '.join(MODELS)}")
    print(pull(name, force=force))
    return 0


def cmd_calibrate(overrides: list[str], target: float, num_prompts: int, name: str | None) -> int:
    """Find per-phase skip-softmax scales reaching `target` sparsity on the task's held-out prompts."""
    import dataclasses

    import torch
    import yaml

    from slipstream.config import compose, user_conf_dir
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.calibration import calibrate_skip_scale
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams
    from slipstream.tasks import build_task
    from slipstream.trainer.rl_loop import encode_prompt, pick_device

    cfg = compose(overrides)
    device = pick_device(cfg.trainer.device)
    model, tok = load_model_and_tokenizer(cfg.model, device)
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                     device=device)
    del model
    params = SamplingParams(temperature=0.0, max_tokens=cfg.rollout.eval_max_tokens)
    problems = build_task(cfg.task).eval_problems()[:num_prompts]
    requests = [Request(encode_prompt(tok, p, cfg.task.system_prompt), params, p.uid, p.uid) for p in problems]
    rc = cfg.rollout
    # one rollout per engine: capturing only the graphs it uses is cheaper than every bucket's
    base = EngineConfig(block_size=rc.block_size, kv_cache_gb=rc.kv_cache_gb, max_num_seqs=rc.max_num_seqs,
                        max_num_batched_tokens=rc.max_num_batched_tokens, max_model_len=rc.max_model_len,
                        capture_graphs_at_start=False)
    scales = {}
    for phase in ("prefill", "decode"):
        def make(scale, phase=phase):
            return Engine(decoder, [tok.eos_token_id], dataclasses.replace(base, **{f"{phase}_skip_scale": scale}))

        result = calibrate_skip_scale(make, requests, phase, target,
                                      progress=lambda s, sp, phase=phase: print(f"  {phase}: scale {s:.4g} -> "
                                                                                f"sparsity {sp:.3f}", flush=True))
        scales[phase] = result.scale
        reached = "" if result.sparsity >= target else " (target not reachable on these prompts: contexts too short)"
        print(f"{phase}: scale {result.scale:.4g}, measured sparsity {result.sparsity:.3f}{reached}")
    name = name or f"calibrated-{Path(cfg.model.name).name}"
    path = user_conf_dir() / "attention" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# slipstream calibrate-sparsity: target sparsity {target} on {len(requests)} "
                    f"{cfg.task.name} prompts, model {cfg.model.name}\n" +
                    yaml.safe_dump({"kind": "blasst", "prefill_scale": float(scales["prefill"]),
                                    "decode_scale": float(scales["decode"])}))
    print(f"wrote {path}\nuse it with: slipstream train attention={name} ...")
    return 0


def cmd_drafter_warmup(overrides: list[str], out: str, steps: int, prompts: int, progress: bool) -> int:
    """Train a drafter offline on the target's own samples of the task prompts and write it to `out`."""
    from slipstream.config import compose, drafter_config
    from slipstream.drafter.warmup import warmup

    cfg = compose(overrides)
    r = warmup(cfg, out, steps, prompts, drafter_config(cfg.drafter, cfg.trainer.seed), show_progress=progress)
    print(f"drafter warmup: {r.samples} samples, {r.tokens} tokens, {r.pairs} training pairs, {r.steps} steps, "
          f"loss {r.first_loss:.4f} -> {r.last_loss:.4f}\nwrote {r.path}")
    return 0


def cmd_recipes() -> int:
    from slipstream.config import available_recipes, recipes_dir

    for name in available_recipes():
        first = (recipes_dir() / f"{name}.yaml").read_text().splitlines()
        about = next((line.lstrip("# ").strip() for line in first[1:] if line.startswith("#")), "")
        print(f"{name:24s} {about}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slipstream", description="RL post-training for reasoning LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a recipe: slipstream train recipe=NAME key=value ...")
    t.add_argument("overrides", nargs="*", help="hydra overrides, e.g. recipe=smoke trainer.steps=5")
    t.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    r = sub.add_parser("report", help="write plots and a summary for a run directory")
    r.add_argument("run_dir")
    e = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    e.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    m = sub.add_parser("models", help="registered models: list, pull NAME")
    m.add_argument("action", choices=["list", "pull"])
    m.add_argument("name", nargs="?")
    m.add_argument("--force", action="store_true", help="pull again even if cached")
    sub.add_parser("recipes", help="list the available recipes")
    d = sub.add_parser("drafter", help="the learned drafter: warmup (train offline from the target's samples)")
    d.add_argument("action", choices=["warmup"])
    d.add_argument("overrides", nargs="*", help="hydra overrides choosing the model, task, rollout and drafter.*")
    d.add_argument("--out", required=True, help="drafter file to write")
    d.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    d.add_argument("--prompts", type=int, default=64, help="training prompts to sample from (default 64)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    c = sub.add_parser("calibrate-sparsity", help="find skip-softmax scales that reach a target sparsity")
    c.add_argument("overrides", nargs="*", help="hydra overrides choosing the model, task and rollout")
    c.add_argument("--target", type=float, default=0.7, help="fraction of key tiles to skip (default 0.7)")
    c.add_argument("--prompts", type=int, default=16, help="held-out prompts to measure on (default 16)")
    c.add_argument("--name", help="name of the attention option to write (default calibrated-<model>)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args.overrides, args.print_config)
        if args.command == "report":
            return cmd_report(args.run_dir)
        if args.command == "export":
            return cmd_export(args.run_dir, args.out, args.step)
        if args.command == "models":
            return cmd_models(args.action, args.name, args.force)
        if args.command == "calibrate-sparsity":
            return cmd_calibrate(args.overrides, args.target, args.prompts, args.name)
        if args.command == "drafter":
            return cmd_drafter_warmup(args.overrides, args.out, args.steps, args.prompts, not args.no_progress)
        return cmd_recipes()
    except _user_errors() as e:
        # Under torchrun every rank prints its own errors: say which rank this is.
        where = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"slipstream{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slipstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
