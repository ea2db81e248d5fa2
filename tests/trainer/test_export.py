"""`slipstream export`: a run's checkpoint as a Hugging Face directory that transformers loads."""

import copy

import torch
from omegaconf import OmegaConf

from slipstream.cli import main
from slipstream.config import compose
from slipstream.trainer.backends import OptimizerSpec, build_backend
from slipstream.trainer.checkpoint import TrainState
from slipstream.trainer.distributed import DistContext
from slipstream.trainer.sharded_checkpoint import save_train_checkpoint

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_export_writes_the_checkpoint_weights_loadable_by_transformers(tmp_path, tiny_model, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(OmegaConf.structured(compose(["recipe=smoke"])), run / "config.yaml")
    model = copy.deepcopy(tiny_model[0])
    backend = build_backend("local", model, CPU, OptimizerSpec(lr=1e-3))
    for step, shift in ((1, 0.5), (2, 1.0)):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.add_(shift)
        save_train_checkpoint(run / "checkpoints", TrainState(step, 0, step), {"actor": backend}, CPU, keep=3)

    assert main(["export", str(run), "--step", "1", "--out", str(tmp_path / "hf")]) == 0
    assert "step_000001" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    expected = tiny_model[0].model.layers[1].mlp.down_proj.weight + 0.5
    assert torch.equal(exported.model.layers[1].mlp.down_proj.weight, expected)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("2+2")["input_ids"] == tiny_model[1]("2+2")["input_ids"]

    main(["export", str(run), "--out", str(tmp_path / "hf")])  # newest checkpoint, replacing the directory
    latest = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for (name, a), (_, b) in zip(latest.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


def test_export_names_what_is_missing(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
    OmegaConf.save(OmegaConf.structured(compose(["recipe=smoke"])), tmp_path / "config.yaml")
    assert main(["export", str(tmp_path), "--step", "4", "--out", str(tmp_path / "hf")]) == 2
    assert "step_000004 is not a complete checkpoint" in capsys.readouterr().err
