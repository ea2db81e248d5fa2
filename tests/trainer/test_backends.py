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


def test_every_rank_takes_an_equal_contiguous_share_of_whole_groups():
    from slipstream.trainer.distributed import DistContext, DistributedSetupError, shard_groups

    prompts = [f"p{i}" for i in range(6)]
    shares = [shard_groups(prompts, DistContext(rank=r, world_size=3, local_rank=r, device=torch.device("cpu")))
              for r in range(3)]
    assert shares == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    with pytest.raises(DistributedSetupError, match=r"prompts_per_step=6 must be a multiple of the number of ranks "
                                                    r"\(4\)"):
        shard_groups(prompts, DistContext(rank=0, world_size=4, local_rank=0, device=torch.device("cpu")))


def test_the_generation_window_swaps_optimizer_state_and_kv_cache_even_on_error():
    from types import SimpleNamespace

    from slipstream.trainer.parts import TrainParts

    events = []
    backend = SimpleNamespace(offload_optimizer=lambda: events.append("offload optimizer"),
                              reload_optimizer=lambda: events.append("reload optimizer"))
    engine = SimpleNamespace(restore_cache=lambda: events.append("allocate kv"),
                             release_cache=lambda: events.append("free kv"))
    parts = TrainParts(actor=SimpleNamespace(backend=backend), critic=SimpleNamespace(backend=backend))
    with pytest.raises(RuntimeError, match="engine failed"):
        with parts.generating(engine, colocate=True):
            events.append("generate")
            raise RuntimeError("engine failed")
    assert events == ["offload optimizer", "offload optimizer", "allocate kv", "generate", "free kv",
                      "reload optimizer", "reload optimizer"]
    events.clear()
    with parts.generating(engine, colocate=False):  # CPU, or colocation off: nothing moves
        events.append("generate")
    assert events == ["generate"]


def test_fsdp2_groups_consecutive_layers_until_a_unit_holds_the_minimum():
    from transformers import LlamaForCausalLM

    from slipstream.models.tiny import tiny_config
    from slipstream.trainer.backends.base import sharding_units

    model = LlamaForCausalLM(tiny_config(32, 5))
    layers = list(model.model.layers)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    assert sharding_units(model) == [[layer] for layer in layers]
    # two layers reach the minimum; the fifth, short of it alone, joins the unit before it
    assert sharding_units(model, 2 * per_layer) == [layers[0:2], layers[2:5]]
    assert sharding_units(model, per_layer + 1) == [layers[0:2], layers[2:5]]
    # three layers reach it, the last two do not: one unit
    assert sharding_units(model, 2 * per_layer + 1) == [layers]


def test_a_weight_sync_gathers_each_unit_and_then_the_rest_once():
    from transformers import LlamaForCausalLM

    from slipstream.models.tiny import tiny_config
    from slipstream.trainer.backends.base import sharding_units, unit_parameter_names

    model = LlamaForCausalLM(tiny_config(32, 3))
    groups = unit_parameter_names(model, sharding_units(model, 0))
    assert len(groups) == 4
    for i, group in enumerate(groups[:3]):
        assert group and all(n.startswith(f"model.layers.{i}.") for n in group)
    assert groups[3] and not any(".layers." in n for n in groups[3])  # embeddings, final norm (head tied)
    names = [n for group in groups for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
