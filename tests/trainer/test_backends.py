"""Backend selection errors and colocation (the engine's KV cache released while the trainer updates)."""

import pytest
import torch


def test_deepspeed_selected_but_missing_is_a_config_error(monkeypatch):
    import importlib.util

    from slipstream.config import ConfigError, compose

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the deepspeed package, which is not installed: pip install "
                                          r"'slipstream\[deepspeed\]'"):
        compose(["recipe=smoke", "trainer.backend=deepspeed"])


def test_engine_releases_and_restores_its_kv_cache(tiny_model):
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    engine = Engine(decoder_from_hf_module(tiny_model[0], dtype=torch.float32, device=torch.device("cpu")), [2],
                    EngineConfig(num_blocks=16, block_size=4))
    request = [Request([1, 70, 71, 72, 73, 74], SamplingParams(n=2, max_tokens=6, seed=3), "g", "r")]
    before = engine.generate(request)
    engine.release_cache()
    assert engine.runner.kv_caches == []
    engine.restore_cache()
    assert len(engine.runner.kv_caches) == tiny_model[0].config.num_hidden_layers
    assert [c.tokens for c in engine.generate(request)] == [c.tokens for c in before]
