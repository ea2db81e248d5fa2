from dataclasses import fields
from pathlib import Path

import pytest

from slipstream import config as C
from slipstream.config import ConfigError, compose


def test_every_recipe_composes_and_validates():
    assert {"default", "smoke", "smollm2-gpu"} <= set(C.available_recipes())
    for name in C.available_recipes():
        cfg = compose([f"recipe={name}"])
        assert cfg.recipe == name


def test_recipe_and_overrides_take_effect():
    cfg = compose(["recipe=smoke", "trainer.lr=0.5", "algorithm=dapo", "rollout.n=3"])
    assert cfg.model.name == "tiny-random"  # the recipe's group override
    assert cfg.trainer.lr == 0.5 and cfg.rollout.n == 3
    assert cfg.algorithm.clip_high == 0.28 and cfg.algorithm.loss_agg == "token-mean"


@pytest.mark.parametrize("override, expected", [
    ("recipe=smok", "unknown recipe 'smok'; available recipes: default, smoke"),
    ("trainer.lrr=1", "unknown config key 'trainer.lrr'. Did you mean 'trainer.lr'?"),
    ("+trainer.foo=1", "unknown config key 'trainer.foo'"),
    ("traner.lr=1", "Did you mean 'trainer'?"),
    ("trainer.steps=abc", "trainer.steps"),
    ("model=foo", "unknown model 'foo'; available: smollm2-135m-instruct, tiny-random"),
    ("algorithm=ppoo", "unknown algorithm 'ppoo'; available: dapo, dr_grpo, grpo, ppo, reinforce_pp"),
    ("trainer.backend=ddp", "trainer.backend='ddp' is not valid; choose one of: local, fsdp2, deepspeed"),
    ("trainer.zero_stage=4", "trainer.zero_stage=4 is not valid; choose one of: 1, 2, 3"),
    ("rollout=hf trainer.backend=fsdp2", "trainer.backend=fsdp2 needs rollout=native"),
    ("algorithm.lam=1.5", "algorithm.lam=1.5 must be in [0, 1]"),
    ("reward.model_path=/nonexistent", "reward.model_path='/nonexistent' is not a directory"),
    ("reward.rule_weight=0", "reward.rule_weight=0 and no reward.model_path"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg='mean' is not valid; choose one of"),
    ("rollout.temperature=-1", "rollout.temperature=-1.0 must be >= 0"),
    ("task.name=gsm8k", "task.path must name a GSM8K-format file"),
    ("task.style=poem", "task.style='poem' is not valid; choose one of: words, expression"),
    ("rollout.n=1", "rollout.n must be >= 2 for GRPO"),
    ("trainer.steps", "cannot parse override"),
    ("attention=sparse", "unknown attention 'sparse'; available: blasst, dense"),
    ("attention.kind=blasst", "needs attention.prefill_scale or attention.decode_scale > 0"),
    ("trainer.profile_steps=[0,3]", "trainer.profile_steps has [0], outside the run's steps 1..3"),
])
def test_user_mistakes_are_named(override, expected):
    with pytest.raises(ConfigError) as e:
        compose(["recipe=smoke", *override.split()] if not override.startswith("recipe=") else [override])
    assert expected in str(e.value)


def test_config_reference_documents_every_key():
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    for section, schema in C._SECTIONS.items():
        assert f"## {section}" in doc
        for f in fields(schema):
            assert f"`{f.name}`" in doc, f"docs/config.md lacks {section}.{f.name}"
