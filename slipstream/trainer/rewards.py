"""Reward sources: the task's verifier and, optionally, a learned reward model, combined by weights.

The reward model is any Hugging Face sequence-classification checkpoint with one output (e.g.
`LlamaForSequenceClassification`); it scores the prompt the policy saw followed by the response,
in batches, on this rank's device. The combined reward is
`reward.rule_weight * verifier + reward.model_weight * score`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slipstream.config import RewardConfig


class RewardModelError(RuntimeError):
    """The reward model directory cannot be used (not a checkpoint, more than one output, ...)."""


class RewardModel:
    def __init__(self, path: str | Path, device: torch.device, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise RewardModelError(f"reward.model_path={str(path)!r} is not a sequence-classification checkpoint: "
                                   f"{e}") from None
        if self.model.config.num_labels != 1:
            raise RewardModelError(f"reward.model_path={str(path)!r} has {self.model.config.num_labels} outputs; a "
                                   f"reward model has exactly one (num_labels=1)")
        if self.tokenizer.pad_token_id is None:
            raise RewardModelError(f"the tokenizer of reward.model_path={str(path)!r} has no pad token: batches "
                                   f"cannot be padded")
        # The score is read at the last non-padding token, which the model finds through its pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """One scalar per text, `batch_size` texts per forward pass."""
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out


class RewardScorer:
    """Rewards of a step's samples: the verifier's, the reward model's, and their weighted sum."""

    def __init__(self, task, cfg: RewardConfig, device: torch.device):
        self.task, self.cfg = task, cfg
        self.model = RewardModel(cfg.model_path, device, cfg.batch_size) if cfg.model_path else None

    def __call__(self, problems, prompt_texts: list[str], texts: list[str]) -> tuple[list[float], dict[str, float]]:
        """`problems[i]`, `prompt_texts[i]` and `texts[i]` belong to sample i."""
        rule = [float(self.task.reward(p, t)) for p, t in zip(problems, texts)]
        if self.model is None:
            return [self.cfg.rule_weight * r for r in rule], {}
        scores = self.model.score([p + t for p, t in zip(prompt_texts, texts)])
        rewards = [self.cfg.rule_weight * r + self.cfg.model_weight * s for r, s in zip(rule, scores)]
        n = max(len(rule), 1)
        return rewards, {"reward/rule_mean": sum(rule) / n, "reward/model_mean": sum(scores) / n}
