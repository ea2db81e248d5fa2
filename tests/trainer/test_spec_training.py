"""spec=suffix through the RL loop: group ids reach the drafter, speculation metrics and the
rollout timeline are logged, and the drafter's history survives a resume."""

import json

from slipstream.config import compose
from slipstream.trainer.rl_loop import train


def _overrides(run_dir, steps):
    # Every prompt repeats every step (4 problems, 4 prompts per step); drafts at any batch size, the
    # bandit exploring at random (seeded) rather than by measured throughput, so nothing depends on timing.
    return ["recipe=smoke", "spec=suffix", f"trainer.run_dir={run_dir}", "logger.wandb=false",
            f"trainer.steps={steps}", "task.num_train=4", "trainer.save_every=1", "spec.min_batch_for_off=1000",
            "spec.epsilon=1.0", "spec.explore_cost=null", "trainer.threads=1"]


def _spec_state(run_dir, step):
    state = json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / "rollout_rank0.json").read_text())
    return state["spec"]["drafter"]


def test_speculation_in_training_logs_metrics_and_resumes_with_its_trees(tmp_path):
    train(compose(_overrides(tmp_path, 1)))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r["step"] == 1)
    assert step1["spec/drafted_tokens"] > 0 and step1["spec/steps_spec"] > 0
    assert 0 <= step1["spec/accepted_tokens"] <= step1["spec/drafted_tokens"]
    rollouts = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    timeline = rollouts[0]["timeline"]
    assert len(timeline["live"]) == len(timeline["drafted"]) > 0 and timeline["live"][0] == 16
    assert (tmp_path / "report" / "rollout_timeline.png").stat().st_size > 1000

    # Step 1's rollout fed the windows (one drafter step); the evaluations, on held-out prompts, did not.
    before = _spec_state(tmp_path, 1)
    assert before["step"] == 1
    group_ids = {p["group_id"] for p in before["prompts"]}
    assert len(group_ids) == 4  # the 4 training prompts, by their uid

    train(compose(_overrides(tmp_path, 2)))  # resumes from step 1
    after = _spec_state(tmp_path, 2)
    assert after["step"] == 2  # continued from the checkpoint's history, not from scratch
    assert {p["group_id"] for p in after["prompts"]} == group_ids
    assert all(len(p["rollouts"]) == 2 * 4 for p in after["prompts"])  # both steps' 4 samples


def test_spec_config_group_choices_and_mistakes():
    import pytest

    from slipstream.config import ConfigError, engine_spec_config

    assert compose(["recipe=smoke"]).spec.kind == "off" and engine_spec_config(compose(["recipe=smoke"]).spec) is None
    gpu = compose(["recipe=smollm2-gpu"])
    spec = engine_spec_config(gpu.spec, seed=7)
    assert gpu.spec.kind == "suffix" and spec.policy.draft_lens == (0, 2, 4, 8, 15) and spec.policy.seed == 7
    with pytest.raises(ConfigError, match="spec=suffix needs rollout=native"):
        compose(["recipe=smoke", "spec=suffix", "rollout=hf"])
    with pytest.raises(ConfigError, match="epsilon must be in"):
        compose(["recipe=smoke", "spec=suffix", "spec.epsilon=2"])
    with pytest.raises(ConfigError, match="unknown spec 'medusa'; available: both, drafter, off, suffix"):
        compose(["recipe=smoke", "spec=medusa"])
