"""resolve_model and load_model_and_tokenizer."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from slipstream.config import ModelConfig
from slipstream.models import (
    MODELS,
    ModelLoadError,
    build_tiny_model_dir,
    cache_dir,
    is_complete,
    load_model_and_tokenizer,
    model_dir,
    resolve_dtype,
    resolve_model,
)
from slipstream.models import loading

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SLIPSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("local") / "tiny")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIPSTREAM_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SLIPSTREAM_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "slipstream"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "slipstream"
    assert model_dir("x") == tmp_path / "home" / ".cache" / "slipstream" / "models" / "x"


def test_registry_names():
    assert {"smollm2-135m-instruct", "tiny-random"} <= set(MODELS)


def test_resolve_local_directory_is_returned_as_is(tiny_dir, cache):
    assert resolve_model(str(tiny_dir)) == str(tiny_dir)
    assert resolve_model(tiny_dir) == str(tiny_dir)
    assert not cache.exists(), "a local directory needs nothing from the cache"


def test_resolve_tiny_random_builds_once(cache):
    first = resolve_model("tiny-random")
    assert Path(first) == cache / "models" / "tiny-random"
    assert is_complete(Path(first))
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-random") == first
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp

    other = resolve_model("tiny-random", tiny_hidden_size=32, tiny_layers=1)
    assert Path(other).name == "tiny-random-h32-l1" and is_complete(Path(other))
    assert not list((cache / "models").glob(".*")), "no work directories left behind"


def test_resolve_registered_missing_without_pull(cache):
    with pytest.raises(ModelLoadError, match="slipstream models pull smollm2-135m-instruct"):
        resolve_model("smollm2-135m-instruct", pull_missing=False)


def test_resolve_registered_missing_pulls(cache, monkeypatch, tiny_dir):
    import shutil

    from slipstream.models import SOURCE_FILE
    from slipstream.models import registry

    pulled = []

    def fake_pull(name, force=False, progress=True, **kw):
        pulled.append(name)
        target = registry.model_dir(name)
        shutil.copytree(tiny_dir, target)
        (target / SOURCE_FILE).write_text("{}")
        return target

    monkeypatch.setattr(importlib.import_module("slipstream.models.pull"), "pull", fake_pull)
    path = resolve_model("smollm2-135m-instruct")
    assert pulled == ["smollm2-135m-instruct"] and Path(path) == model_dir("smollm2-135m-instruct")
    assert resolve_model("smollm2-135m-instruct") == path and pulled == ["smollm2-135m-instruct"]


def test_unknown_name_passes_through_as_hub_id_and_fails_clearly(cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    cfg = ModelConfig(name="definitely-not-a-model-xyz")
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(cfg, CPU)
    message = str(info.value)
    assert "definitely-not-a-model-xyz" in message
    for name in MODELS:
        assert name in message
    assert "local directory" in message


def test_missing_local_path_is_reported(cache, tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model(str(tmp_path / "nowhere"))


def test_load_tiny_dtype_auto_is_float32_on_cpu_and_pads_left(cache):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny-random"), CPU)
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["1", "1+2+3="], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padding
    assert model.config.pad_token_id == tok.pad_token_id


def test_load_sets_missing_pad_token_to_eos(cache, tmp_path, tiny_dir):
    import shutil

    from transformers import AutoTokenizer

    local = tmp_path / "nopad"
    shutil.copytree(tiny_dir, local)
    tok = AutoTokenizer.from_pretrained(local)
    tok.pad_token = None
    tok.save_pretrained(local)
    assert AutoTokenizer.from_pretrained(local).pad_token is None

    model, tok = load_model_and_tokenizer(ModelConfig(name=str(local), dtype="bfloat16"), CPU)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing_flag(cache, tiny_dir):
    model, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_dir), gradient_checkpointing=True), CPU)
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(model, flag)
    model.train()
    ids = torch.randint(3, 200, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    with pytest.raises(ModelLoadError):
        resolve_dtype("int8", CPU)
    assert loading.resolve_dtype is resolve_dtype
