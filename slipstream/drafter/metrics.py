"""What the RL loop logs about the drafter: loss, acceptance per source, bubbles, staleness."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["BubbleReport", "DrafterMetrics"]


@dataclass
class BubbleReport:
    """One bubble: its kind (rank_idle, reward, side_stream, warmup), the seconds it lasted, the
    seconds spent training in it, optimizer steps taken, and whether a stop cut it short of data."""

    kind: str
    available_s: float
    used_s: float
    steps: int


class DrafterMetrics:
    """Accumulates over one RL step; `as_dict` returns the numbers and starts the next step.

    Acceptance comes from verification results, per draft source ("suffix", "drafter", ...):
    accepted draft tokens per verification (acceptance length) and accepted / drafted; and,
    whatever was drafted, from the step's rollout: `rollout_accept`, the probability that a first
    draft token is accepted (`bubble_trainer.expected_acceptance`), before the drafter trains on it.
    Staleness: `data_staleness` is the current step minus the mean RL step of the rows trained on
    this step; `weights_staleness` the current step minus the newest step whose data the drafter
    has been trained on (how many policy updates the drafter lags behind).
    """

    def __init__(self):
        self._reset()

    def _reset(self):
        self._loss = []  # per optimizer step: (loss, feature_loss, token_kl, top1) tensors
        self._data_steps: list[float] = []
        self._bubbles: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        self._accept: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        self._rollout_accept: float | None = None

    def record_rollout_acceptance(self, value: float) -> None:
        """The drafter's expected acceptance on this step's rollout (`expected_acceptance`)."""
        self._rollout_accept = value

    def record_train(self, stats: dict[str, torch.Tensor], mean_data_step: float) -> None:
        self._loss.append(torch.stack([stats["loss"], stats["feature_loss"], stats["token_kl"], stats["top1"]]))
        self._data_steps.append(mean_data_step)

    def record_bubble(self, report: BubbleReport) -> None:
        b = self._bubbles[report.kind]
        b[0] += report.available_s
        b[1] += report.used_s
        b[2] += report.steps

    def record_verify(self, source: str, draft_lens: Iterable[int], accepted_lens: Iterable[int]) -> None:
        """A verification step's draft and accepted lengths per request, for drafts of one source,
        as host integers (the engine has them after its one read per step). Requests that drafted
        nothing do not count."""
        a = self._accept[source]
        for drafted, accepted in zip(draft_lens, accepted_lens):
            if drafted > 0:
                a[0] += int(accepted)
                a[1] += int(drafted)
                a[2] += 1

    def as_dict(self, current_step: int, newest_data_step: int | None, version: int | None = None
                ) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._loss:
            loss, feature, kl, top1 = torch.stack(self._loss).float().mean(0).tolist()
            out.update({"drafter/loss": loss, "drafter/feature_loss": feature, "drafter/token_kl": kl,
                        "drafter/top1": top1, "drafter/train_steps": float(len(self._loss)),
                        "drafter/data_staleness": current_step - sum(self._data_steps) / len(self._data_steps)})
        if self._rollout_accept is not None:
            out["drafter/rollout_accept"] = self._rollout_accept
        if newest_data_step is not None:
            out["drafter/weights_staleness"] = float(current_step - newest_data_step)
        if version is not None:
            out["drafter/version"] = float(version)
        total_available = total_used = 0.0
        for kind, (available, used, steps) in sorted(self._bubbles.items()):
            out[f"drafter/bubble_{kind}_available_s"] = available
            out[f"drafter/bubble_{kind}_used_s"] = used
            out[f"drafter/bubble_{kind}_steps"] = float(steps)
            total_available += available
            total_used += used
        if self._bubbles:
            out["drafter/bubble_available_s"] = total_available
            out["drafter/bubble_used_s"] = total_used
        for source, (accepted, drafted, verifies) in sorted(self._accept.items()):
            out[f"spec/{source}/acceptance_len"] = accepted / verifies if verifies else 0.0
            out[f"spec/{source}/acceptance_rate"] = accepted / drafted if drafted else 0.0
        self._reset()
        return out
