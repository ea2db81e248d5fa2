"""`slipstream drafter warmup` on the tiny random model: samples, trains, writes a loadable drafter."""

import pytest
import torch

from slipstream.cli import main
from slipstream.drafter.warmup import DrafterFileError, load_drafter, save_drafter
from slipstream.models.decoder import Decoder, DecoderConfig


def _decoder(**kw) -> Decoder:
    c = DecoderConfig(**{"model_type": "llama", "vocab_size": 259, "hidden_size": 64, "num_layers": 2,
                         "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128, **kw})
    d = Decoder(c)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    return d


def test_warmup_cli_writes_a_drafter_that_learned_and_loads(tmp_path, capsys):
    out = tmp_path / "drafter.pt"
    rc = main(["drafter", "warmup", "recipe=smoke", "rollout.n=2", "rollout.max_tokens=24", "drafter.lr=3e-3",
               "--prompts", "4", "--steps", "30", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and str(out) in printed
    blob = torch.load(out, weights_only=True)
    assert blob["model"] == "tiny-random" and blob["extra"]["steps"] == 30
    first, last = (float(x) for x in printed.split("loss ")[1].split("\n")[0].split(" -> "))
    assert last < first * 0.7  # training took hold
    # It loads onto a decoder of the same shape, and refuses another target.
    drafter = load_drafter(out, _decoder())
    assert all(torch.equal(v, blob["state_dict"][k]) for k, v in drafter.state_dict().items())
    with pytest.raises(DrafterFileError, match="trained for tiny-random"):
        load_drafter(out, _decoder(hidden_size=32, head_dim=8))


def test_bad_drafter_files_are_named(tmp_path):
    with pytest.raises(DrafterFileError, match="does not exist"):
        load_drafter(tmp_path / "none.pt", _decoder())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DrafterFileError, match="not a readable drafter file"):
        load_drafter(junk, _decoder())
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DrafterFileError, match="not a slipstream drafter file"):
        load_drafter(tmp_path / "other.pt", _decoder())


def test_a_bad_drafter_setting_is_a_one_line_error(tmp_path, capsys):
    rc = main(["drafter", "warmup", "recipe=smoke", "drafter.lr=-1", "--out", str(tmp_path / "d.pt"),
               "--no-progress"])
    assert rc == 2
    assert "drafter.lr" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "d.pt").exists()


def test_save_then_load_round_trip_keeps_training_settings(tmp_path):
    from slipstream.drafter import Drafter, DrafterConfig, TargetHead

    target = _decoder()
    d = Drafter(target.config, TargetHead.from_decoder(target), DrafterConfig(window=12, lr=1e-3))
    path = save_drafter(tmp_path / "x.pt", d, "test-model")
    again = load_drafter(path, target, DrafterConfig(lr=5e-4, window=99))
    assert again.config.window == 12 and again.config.lr == 5e-4  # shape from the file, the rest from the caller


def test_the_config_group_gives_the_drafter_its_settings_and_the_run_seed():
    from slipstream.config import ConfigError, compose, drafter_config

    cfg = compose(["recipe=smoke", "drafter=online", "drafter.window=32", "trainer.seed=5"])
    d = drafter_config(cfg.drafter, cfg.trainer.seed)
    assert d.window == 32 and d.seed == 5 and cfg.drafter.kind == "online"
    assert d.buffer_storage == cfg.drafter.buffer_storage and d.side_stream_max_batch == cfg.drafter.side_stream_max_batch
    with pytest.raises(ConfigError, match="drafter.window must be >= 1"):
        drafter_config(compose(["recipe=smoke", "drafter.window=0"]).drafter)
