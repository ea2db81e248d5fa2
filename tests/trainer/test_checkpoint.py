import random

import pytest
import torch

from slipstream.trainer import checkpoint as ck
from slipstream.trainer import sharded_checkpoint as sc
from slipstream.trainer.backends import OptimizerSpec, build_backend
from slipstream.trainer.distributed import DistContext

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _backend(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    backend = build_backend("local", model, CPU, OptimizerSpec(lr=0.1))
    backend.backward(model(torch.randn(2, 4)).sum(), last=True)
    backend.step()
    return backend


def test_round_trip_restores_model_optimizer_rng_and_position(tmp_path):
    actor = _backend(0)
    torch.manual_seed(123)
    random.seed(7)
    path = sc.save_train_checkpoint(tmp_path, ck.TrainState(step=3, epoch=1, position=5), {"actor": actor}, CPU)
    expected_draw, expected_py = torch.rand(3), random.random()
    other = _backend(1)
    state = sc.load_train_checkpoint(path, {"actor": other}, CPU)
    assert state == ck.TrainState(step=3, epoch=1, position=5)
    assert torch.equal(other.module.weight, actor.module.weight)
    assert torch.equal(other.optimizer.state_dict()["state"][0]["exp_avg"],
                       actor.optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw) and random.random() == expected_py


def test_a_write_killed_midway_is_never_picked_up(tmp_path, monkeypatch):
    actor = _backend(0)
    good = sc.save_train_checkpoint(tmp_path, ck.TrainState(2, 0, 4), {"actor": actor}, CPU)

    def dying_save(obj, path):  # the model and optimizer are written, the RNG state is not
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sc, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sc.save_train_checkpoint(tmp_path, ck.TrainState(4, 0, 8), {"actor": actor}, CPU)
    assert any(p.name.startswith(".step_000004.tmp-") for p in tmp_path.iterdir())
    assert ck.latest_checkpoint(tmp_path) == good
    assert sc.resume_path("auto", tmp_path, CPU) == good and sc.resume_path("never", tmp_path, CPU) is None
    # a step_N directory without the marker (e.g. copied by hand, truncated) is ignored too
    (tmp_path / "step_000009").mkdir()
    assert ck.latest_checkpoint(tmp_path) == good
    with pytest.raises(ck.CheckpointError, match="step_000009"):
        sc.load_train_checkpoint(tmp_path / "step_000009", {"actor": actor}, CPU)


def test_keep_prunes_old_checkpoints_and_leftovers(tmp_path):
    actor = _backend(0)
    (tmp_path / ".step_000001.tmp-999").mkdir()
    for step in (1, 2, 3):
        sc.save_train_checkpoint(tmp_path, ck.TrainState(step, 0, step), {"actor": actor}, CPU, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]


def test_a_checkpoint_without_a_part_the_run_trains_is_refused(tmp_path):
    path = sc.save_train_checkpoint(tmp_path, ck.TrainState(1, 0, 1), {"actor": _backend(0)}, CPU)
    with pytest.raises(ck.CheckpointError, match="has no critic .*another algorithm"):
        sc.load_train_checkpoint(path, {"actor": _backend(1), "critic": _backend(2)}, CPU)
