"""The learned reward model as a reward source, alone and combined with the verifier."""

import json

import pytest
import torch

from slipstream.config import RewardConfig, compose
from slipstream.models.tiny import build_tiny_tokenizer, tiny_config
from slipstream.tasks.base import Problem
from slipstream.trainer.rewards import RewardModel, RewardModelError, RewardScorer


def _reward_model_dir(path, num_labels=1):
    from transformers import LlamaForSequenceClassification

    config = tiny_config(32, 1)
    config.num_labels = num_labels
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


class _ExactTask:
    def reward(self, problem, text):
        return float(text.strip() == problem.answer)


TEXTS = ["12", "a much longer response that needs padding in a batch", "7", "x"]


def test_batched_scores_equal_one_at_a_time(tmp_path):
    rm = RewardModel(_reward_model_dir(tmp_path / "rm"), torch.device("cpu"), batch_size=3)
    batched = rm.score(TEXTS)
    alone = [rm.score([t])[0] for t in TEXTS]
    # right padding, and the score read at each text's own last token: padding changes nothing
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == len(TEXTS)  # a random head tells texts apart


def test_rule_and_model_rewards_combine_by_weights(tmp_path):
    path = _reward_model_dir(tmp_path / "rm")
    problems = [Problem(uid=str(i), question="q", answer="12") for i in range(len(TEXTS))]
    prompts = ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"] * len(TEXTS)
    scorer = RewardScorer(_ExactTask(), RewardConfig(rule_weight=2.0, model_path=str(path), model_weight=0.5),
                          torch.device("cpu"))
    rewards, metrics = scorer(problems, prompts, TEXTS)
    scores = RewardModel(path, torch.device("cpu")).score([p + t for p, t in zip(prompts, TEXTS)])
    rule = [1.0, 0.0, 0.0, 0.0]
    assert rewards == pytest.approx([2.0 * r + 0.5 * s for r, s in zip(rule, scores)], abs=1e-5)
    assert metrics["reward/rule_mean"] == 0.25
    assert metrics["reward/model_mean"] == pytest.approx(sum(scores) / 4, abs=1e-6)
    rule_only, extra = RewardScorer(_ExactTask(), RewardConfig(), torch.device("cpu"))(problems, prompts, TEXTS)
    assert rule_only == rule and extra == {}


def test_a_classifier_with_several_outputs_is_refused(tmp_path):
    with pytest.raises(RewardModelError, match="has 3 outputs; a reward model has exactly one"):
        RewardModel(_reward_model_dir(tmp_path / "rm", num_labels=3), torch.device("cpu"))
    with pytest.raises(RewardModelError, match="is not a sequence-classification checkpoint"):
        RewardModel(tmp_path, torch.device("cpu"))


def test_a_run_can_train_on_the_reward_model_alone(tmp_path):
    from slipstream.trainer.rl_loop import train

    path = _reward_model_dir(tmp_path / "rm")
    cfg = compose(["recipe=smoke", f"trainer.run_dir={tmp_path / 'run'}", "logger.wandb=false", "trainer.steps=1",
                   "task.num_eval=2", "rollout.max_tokens=8", "rollout.eval_max_tokens=8",
                   f"reward.model_path={path}", "reward.rule_weight=0", "reward.model_weight=3"])
    train(cfg)
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert row["reward/mean"] == pytest.approx(3 * row["reward/model_mean"], abs=1e-5)
    assert row["reward/std"] > 0  # continuous scores: every group has a learning signal
    assert row["grad_norm"] > 0
