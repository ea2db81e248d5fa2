"""`slipstream export RUN_DIR [--step N] --out DIR`: a checkpoint's actor as a Hugging Face directory.

Works on the checkpoints of every backend without a process group: torch state dicts are read
directly, FSDP2's sharded (DCP) checkpoints are loaded into the full model by DCP's own
resharding, DeepSpeed's ZeRO partitions are consolidated by DeepSpeed's `zero_to_fp32`. The
directory is written next to `--out` and renamed into place, so it is never seen half-written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slipstream.config import ModelConfig
from slipstream.trainer.backends.base import read_format
from slipstream.trainer.backends.deepspeed import CHECKPOINT_TAG
from slipstream.trainer.checkpoint import MARKER, CheckpointError, latest_checkpoint


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    root = run_dir / "checkpoints"
    if step is None:
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint under {root}")
        return path
    path = root / f"step_{step:06d}"
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (kept steps: "
                              f"{', '.join(p.name for p in sorted(root.glob('step_*'))) or 'none'})")
    return path


def actor_state_dict(actor_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full actor weights of a checkpoint's `actor/` directory, whichever backend wrote it."""
    fmt = read_format(actor_dir)
    if fmt == "torch":
        return torch.load(actor_dir / "model.pt", map_location="cpu", weights_only=True)
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        # Tied weights appear once in the checkpoint (FSDP2 saves each parameter once).
        state = {k: v for k, v in model.state_dict().items()
                 if k not in _tied_names(model)}
        dcp.load({"model": state}, checkpoint_id=str(actor_dir))
        return state
    if fmt == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(actor_dir), tag=CHECKPOINT_TAG)
    raise CheckpointError(f"{actor_dir} was written in an unknown format {fmt!r}")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (e.g. a tied LM head)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def export(run_dir: Path, out: Path, step: int | None = None) -> Path:
    from slipstream.models import load_model_and_tokenizer

    run_dir, out = Path(run_dir), Path(out)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    ckpt = find_checkpoint(run_dir, step)
    model_cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(config_file).model))
    model_cfg = dataclasses.replace(model_cfg, dtype="float32") if model_cfg.dtype == "auto" else model_cfg
    model, tokenizer = load_model_and_tokenizer(model_cfg, torch.device("cpu"))
    state = actor_state_dict(ckpt / "actor", model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - _tied_names(model))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / 'actor'} does not match the run's model {model_cfg.name}: "
                              f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ckpt
