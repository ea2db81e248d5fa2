"""Checkpoints of the training backends, written by every rank, with the single-process guarantees.

Layout of `checkpoints/step_N/`: one directory per trained part (`actor/`, `critic/`) in its
backend's format (`format.json` says which: torch, dcp or deepspeed), `rng_rank{R}.pt` per rank,
`rollout_rank{R}.json` per rank when the engine keeps a history (speculation), `drafter_rank{R}.pt`
per rank with a learned drafter,
`trainer_state.json`, and the `COMPLETE` marker. The protocol is the one of `checkpoint.py`:
every rank writes its shards into the same hidden temporary directory and fsyncs them; after a
barrier rank 0 writes the state and the marker and renames the directory in one `os.replace`.
A kill at any point leaves either the previous checkpoints alone or a complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from slipstream.trainer.backends import TrainBackend
from slipstream.trainer.checkpoint import (
    MARKER,
    CheckpointError,
    TrainState,
    _fsync_dir,
    _prune,
    _save,
    latest_checkpoint,
    rng_state,
    save_drafter_state,
    save_rollout_state,
    set_rng_state,
)
from slipstream.trainer.distributed import DistContext


def save_train_checkpoint(root: Path, state: TrainState, parts: dict[str, TrainBackend], ctx: DistContext,
                          keep: int = 2, rollout_state: dict | None = None, drafter_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. `rollout_state`: this rank's
    engine history (`Engine.history_state`), saved as `rollout_rank{R}.json`; `drafter_state`: its
    learned drafter's, as `drafter_rank{R}.pt`."""
    final = root / f"step_{state.step:06d}"
    tmp = root / f".step_{state.step:06d}.tmp-{ctx.broadcast_object(os.getpid())}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    ctx.barrier()
    for name, backend in parts.items():
        backend.save(tmp / name)
    _save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    if rollout_state is not None:
        save_rollout_state(tmp, ctx.rank, rollout_state)
    if drafter_state is not None:
        save_drafter_state(tmp, ctx.rank, drafter_state)
    ctx.barrier()  # every shard is on disk (each rank fsynced its own)
    if ctx.is_main:
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump({**state.__dict__, "world_size": ctx.world_size, "parts": sorted(parts)}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / MARKER, "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(d)
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    ctx.barrier()
    return final


def resume_path(resume: str, root: Path, ctx: DistContext) -> Path | None:
    """The checkpoint to resume from (`auto`: the newest complete one), decided by rank 0 for all."""
    if resume == "never":
        return None
    path = latest_checkpoint(root) if resume == "auto" else Path(resume)
    return ctx.broadcast_object(path)


def load_train_checkpoint(path: Path, parts: dict[str, TrainBackend], ctx: DistContext) -> TrainState:
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    try:
        with open(path / "trainer_state.json") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
    missing = sorted(set(parts) - set(meta.get("parts", [])))
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} (it holds {meta.get('parts')}): "
                              f"it was written by a run with another algorithm")
    try:
        for name, backend in parts.items():
            backend.load(path / name)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
    # A run resumed on another number of ranks keeps going, but its sampling RNG is not the same stream.
    rng_file = path / f"rng_rank{ctx.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(step=meta["step"], epoch=meta["epoch"], position=meta["position"])
