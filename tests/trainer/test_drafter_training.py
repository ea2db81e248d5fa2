"""spec=drafter through the RL loop: the rollouts' features train the learned drafter, the engine
drafts with the new weights, the drafter is checkpointed with the run and restored on resume."""

import json

import pytest
import torch

from slipstream.config import ConfigError, compose
from slipstream.drafter import RunDrafter
from slipstream.trainer.rl_loop import train


def _overrides(run_dir, steps, spec="drafter"):
    # Every prompt repeats every step; drafts at any batch size, the bandits exploring at random (seeded).
    return ["recipe=smoke", f"spec={spec}", "drafter=online", f"trainer.run_dir={run_dir}", "logger.wandb=false",
            f"trainer.steps={steps}", "task.num_train=4", "trainer.save_every=1", "spec.min_batch_for_off=1000",
            "spec.epsilon=1.0", "spec.explore_cost=null", "trainer.threads=1", "drafter.train_steps_after_rollout=6", "drafter.window=16",
            "drafter.batch_tokens=256", "drafter.seq_len=64"]


def _drafter_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "drafter_rank0.pt", weights_only=False)


def test_drafter_trains_in_the_loop_and_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    train(compose(_overrides(tmp_path, 2)))
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    for step in (1, 2):
        m = rows[step]
        assert m["drafter/train_steps"] >= 6 and m["drafter/bubble_after_rollout_steps"] >= 6
        assert "drafter/bubble_reward_available_s" in m and m["drafter/loss"] > 0
        assert m["drafter/weights_staleness"] == 0.0  # trained on this step's rollouts
        assert m["spec/drafter/drafted_tokens"] > 0 and "spec/drafter/acceptance_len" in m
        assert 0.0 < m["drafter/rollout_accept"] < 1.0  # measured on the step's rollout before training
    # step 1's rollout drafted with the initial weights (version 0), step 2's with those published after step 1
    assert rows[1]["spec/drafter/version"] == 0.0 and rows[2]["spec/drafter/version"] == 1.0

    first, second = _drafter_state(tmp_path, 1), _drafter_state(tmp_path, 2)
    assert second["trainer"]["steps"] > first["trainer"]["steps"] >= 6
    changed = [k for k, v in first["trainer"]["drafter"].items() if not torch.equal(v, second["trainer"]["drafter"][k])]
    assert len(changed) == len(first["trainer"]["drafter"])  # every trainable tensor moved

    restored = []
    load = RunDrafter.load_state_dict

    def spy(self, state):
        load(self, state)
        restored.append({"trained": {k: v.clone() for k, v in self.drafter.state_dict().items()},
                         "drafting": self.slot.state_dict(), "steps": self.trainer.steps})
    monkeypatch.setattr(RunDrafter, "load_state_dict", spy)
    train(compose(_overrides(tmp_path, 3)))  # resumes from step 2
    assert len(restored) == 1
    saved = second["trainer"]["drafter"]
    for k, v in saved.items():  # the trained copy and the copy the engine drafts with
        assert torch.equal(restored[0]["trained"][k], v) and torch.equal(restored[0]["drafting"][k], v)
    assert restored[0]["steps"] == second["trainer"]["steps"]
    third = _drafter_state(tmp_path, 3)
    assert third["trainer"]["steps"] >= second["trainer"]["steps"] + 6


def test_drafter_config_mistakes_are_named():
    with pytest.raises(ConfigError, match="spec=drafter drafts with the learned drafter, but drafter=off"):
        compose(["recipe=smoke", "spec=drafter"])
    with pytest.raises(ConfigError, match="spec=both drafts with the learned drafter"):
        compose(["recipe=smoke", "spec=both"])
    with pytest.raises(ConfigError, match="drafter=frozen never trains: it needs drafter.warm_start"):
        compose(["recipe=smoke", "spec=drafter", "drafter=frozen"])
    with pytest.raises(ConfigError, match="spec=drafter has no suffix drafts"):
        compose(["recipe=smoke", "spec=drafter", "drafter=online", "spec.sources=[none,suffix]"])
    with pytest.raises(ConfigError, match="starting with 'none'"):
        compose(["recipe=smoke", "spec=both", "drafter=online", "spec.sources=[both,none]"])
    with pytest.raises(ConfigError, match="spec.sources picks between draft sources of spec=drafter or spec=both"):
        compose(["recipe=smoke", "spec=suffix", "spec.sources=[none,suffix]"])
    with pytest.raises(ConfigError, match="spec=drafter needs rollout=native"):
        compose(["recipe=smoke", "spec=drafter", "drafter=online", "rollout=hf"])
    both = compose(["recipe=smoke", "spec=both", "drafter=online"])
    assert both.spec.sources == ["none", "suffix", "drafter", "both"]


def test_a_learned_drafter_the_engine_never_drafts_with_stops_the_run(tmp_path):
    with pytest.raises(ConfigError, match="drafter=online with spec=suffix: the engine would never draft"):
        train(compose(["recipe=smoke", "spec=suffix", "drafter=online", f"trainer.run_dir={tmp_path}",
                       "logger.wandb=false", "trainer.threads=1"]))


def test_a_frozen_warm_start_drafts_unchanged_through_the_run(tmp_path):
    from slipstream.config import drafter_config
    from slipstream.drafter.warmup import warmup

    cfg = compose(["recipe=smoke", "drafter=online", "drafter.window=16", "drafter.batch_tokens=256",
                   "drafter.seq_len=64", "trainer.threads=1"])
    file = warmup(cfg, tmp_path / "drafter.pt", steps=5, num_prompts=2, drafter_config=drafter_config(cfg.drafter),
                  show_progress=False).path
    warm = torch.load(file, weights_only=True)["state_dict"]
    run = tmp_path / "run"
    train(compose(["recipe=smoke", "spec=drafter", "drafter=frozen", f"drafter.warm_start={file}",
                   f"trainer.run_dir={run}", "logger.wandb=false", "trainer.steps=2", "task.num_train=4",
                   "spec.min_batch_for_off=1000", "spec.epsilon=1.0", "spec.explore_cost=null", "trainer.threads=1"]))
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows[2]["spec/drafter/drafted_tokens"] > 0 and "drafter/loss" not in rows[2]
    saved = _drafter_state(run, 2)
    assert saved["online"] is False
    assert all(torch.equal(saved["drafter"][k], v) for k, v in warm.items())
