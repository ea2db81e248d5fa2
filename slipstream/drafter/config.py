"""`DrafterConfig`: every knob of the learned drafter, its feature buffer and its bubble trainer.

The knobs a user sets are `slipstream.config.DrafterSettings` (the `drafter` config group extends
them); `DrafterConfig` adds the seed, which a run takes from `trainer.seed`, and checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.config import DrafterSettings

STORAGES = ("device", "pinned", "cpu")


@dataclass
class DrafterConfig(DrafterSettings):
    """The drafter's settings and seed, checked: a value out of range raises ValueError naming it."""

    seed: int = 0

    def __post_init__(self):
        positive = ("window", "max_draft_len", "buffer_tokens", "batch_tokens", "seq_len", "slice_steps",
                    "side_stream_max_batch", "side_stream_probe_steps", "side_stream_reprobe_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"drafter.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("intermediate_size", "buffer_max_age", "weight_decay", "feature_loss_weight",
                     "token_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"drafter.{name} must be >= 0, got {getattr(self, name)}")
        if self.buffer_storage not in STORAGES:
            raise ValueError(f"drafter.buffer_storage must be one of {', '.join(STORAGES)}, "
                             f"got {self.buffer_storage!r}")
        if not self.lr > 0 or not self.max_grad_norm > 0:
            raise ValueError(f"drafter.lr and drafter.max_grad_norm must be > 0, got {self.lr}, "
                             f"{self.max_grad_norm}")
        if not 0 < self.side_stream_max_slowdown < 1:
            raise ValueError(f"drafter.side_stream_max_slowdown must be in (0, 1), "
                             f"got {self.side_stream_max_slowdown}")
        if self.feature_loss_weight == 0 and self.token_loss_weight == 0:
            raise ValueError("drafter.feature_loss_weight and drafter.token_loss_weight are both 0: nothing to learn")
