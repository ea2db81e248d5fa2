import random

import pytest
import torch

from slipstream.trainer import checkpoint as ck


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_rng_and_position(tmp_path):
    model, opt = _model_and_opt(0)
    torch.manual_seed(123)
    random.seed(7)
    path = ck.save_checkpoint(tmp_path, ck.TrainState(step=3, epoch=1, position=5), model, opt)
    expected_draw, expected_py = torch.rand(3), random.random()
    other, other_opt = _model_and_opt(1)
    state, _ = ck.load_checkpoint(path, other, other_opt)
    assert state == ck.TrainState(step=3, epoch=1, position=5)
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw) and random.random() == expected_py


def test_a_write_killed_midway_is_never_picked_up(tmp_path, monkeypatch):
    model, opt = _model_and_opt(0)
    good = ck.save_checkpoint(tmp_path, ck.TrainState(2, 0, 4), model, opt)
    real_save = ck._save
    calls = {"n": 0}

    def dying_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # model written, optimizer not yet
            raise KeyboardInterrupt("killed")
        real_save(obj, path)

    monkeypatch.setattr(ck, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, ck.TrainState(4, 0, 8), model, opt)
    assert any(p.name.startswith(".step_000004.tmp-") for p in tmp_path.iterdir())
    assert ck.latest_checkpoint(tmp_path) == good
    # a step_N directory without the marker (e.g. copied by hand, truncated) is ignored too
    (tmp_path / "step_000009").mkdir()
    assert ck.latest_checkpoint(tmp_path) == good
    with pytest.raises(ck.CheckpointError, match="step_000009"):
        ck.load_checkpoint(tmp_path / "step_000009", model, opt)


def test_keep_prunes_old_checkpoints_and_leftovers(tmp_path):
    model, opt = _model_and_opt(0)
    (tmp_path / ".step_000001.tmp-999").mkdir()
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, ck.TrainState(step, 0, step), model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]
