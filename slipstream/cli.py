"""`slipstream train|report|models|recipes`: the command line.

User mistakes (config, data files, model names, run directories) print one clear line and exit
with status 2, without a Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from slipstream.config import ConfigError
    from slipstream.models import ModelLoadError
    from slipstream.tasks import TaskDataError
    from slipstream.telemetry import ReportError
    from slipstream.trainer.checkpoint import CheckpointError

    return ConfigError, ModelLoadError, TaskDataError, ReportError, CheckpointError


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
    m = sub.add_parser("models", help="registered models: list, pull NAME")
    m.add_argument("action", choices=["list", "pull"])
    m.add_argument("name", nargs="?")
    m.add_argument("--force", action="store_true", help="pull again even if cached")
    sub.add_parser("recipes", help="list the available recipes")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args.overrides, args.print_config)
        if args.command == "report":
            return cmd_report(args.run_dir)
        if args.command == "models":
            return cmd_models(args.action, args.name, args.force)
        return cmd_recipes()
    except _user_errors() as e:
        print(f"slipstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slipstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
