"""Atomic checkpoints: a checkpoint directory either is complete or is never seen by resume.

A checkpoint is written into `checkpoints/.step_N.tmp-PID`, every file fsynced, a `COMPLETE`
marker written last, then renamed to `checkpoints/step_N` in one `os.replace`. Resume only
considers `step_N` directories holding the marker; leftovers of a killed write are removed.
This module holds the pieces of that protocol; `sharded_checkpoint.py` writes and reads whole
checkpoints (every rank's shards of every trained part).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int  # number of completed RL steps
    epoch: int  # data epoch in progress
    position: int  # index of the next prompt within the epoch's order


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rollout_state_file(directory: Path, rank: int) -> Path:
    return directory / f"rollout_rank{rank}.json"


def save_rollout_state(directory: Path, rank: int, state: dict) -> None:
    """The rollout engine's history of one rank (speculation trees and statistics: each rank
    drafts for its own prompts), as JSON, fsynced; part of the checkpoint written in `directory`."""
    with open(_rollout_state_file(directory, rank), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_rollout_state(path: Path, rank: int) -> dict | None:
    """What `save_rollout_state` wrote for `rank` in checkpoint `path`; None if it holds none
    (a run without speculation, or another number of ranks)."""
    file = _rollout_state_file(path, rank)
    if not file.is_file():
        return None
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot load the rollout state of rank {rank} from {path}: {e}") from e


def _drafter_state_file(directory: Path, rank: int) -> Path:
    return directory / f"drafter_rank{rank}.pt"


def save_drafter_state(directory: Path, rank: int, state: dict) -> None:
    """The learned drafter of one rank (trainable weights, optimizer state, counters), fsynced;
    part of the checkpoint written in `directory`."""
    _save(state, _drafter_state_file(directory, rank))


def load_drafter_state(path: Path, rank: int) -> dict | None:
    """What `save_drafter_state` wrote for `rank` in checkpoint `path`; None if it holds none
    (a run without a learned drafter)."""
    file = _drafter_state_file(path, rank)
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot load the drafter state of rank {rank} from {path}: {e}") from e


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for p in root.iterdir():
        if p.name.startswith(".step_") and ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)  # a write killed earlier
    if keep > 0:
        for _, p in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None
