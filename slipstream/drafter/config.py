"""`DrafterConfig`: every knob of the learned drafter, its feature buffer and its bubble trainer."""

from __future__ import annotations

from dataclasses import dataclass

STORAGES = ("device", "pinned", "cpu")


@dataclass
class DrafterConfig:
    """Settings of the drafter model, its feature buffer and its training in bubbles.

    Model: `capture_layer` is the target layer whose residual stream feeds the drafter (the
    decoder's capture convention: -1 is the last layer, before the final norm); `window` is how
    many earlier positions the drafter's attention sees, in training and drafting alike;
    `intermediate_size` 0 takes the target's MLP width. `max_draft_len` is the longest chain.

    Buffer: at most `buffer_tokens` token rows, none older than `buffer_max_age` RL steps, kept in
    `buffer_storage` (device: the target's device; pinned: page-locked host memory filled by
    asynchronous copies; cpu: plain host memory).

    Training: AdamW at `lr`; each optimizer step sees about `batch_tokens` aligned positions, cut
    into pieces of at most `seq_len` packed into rows; `slice_steps` optimizer steps form one
    preemptible slice (the stop condition is checked between slices). The loss is
    `feature_loss_weight` x SmoothL1(predicted, true next feature; both through the target's final
    norm) + `token_loss_weight` x
    KL(target distribution || drafter distribution) at the next position (EAGLE's 1.0 / 0.1).

    Side stream: training overlaps decode only while the live batch is at most
    `side_stream_max_batch` and the measured slowdown of decode steps stays under
    `side_stream_max_slowdown`; each measurement uses `side_stream_probe_steps` steps with and
    without training and is repeated every `side_stream_reprobe_steps` steps.
    """

    capture_layer: int = -1
    window: int = 64
    intermediate_size: int = 0
    max_draft_len: int = 8
    buffer_tokens: int = 262144
    buffer_max_age: int = 2
    buffer_storage: str = "device"
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_tokens: int = 2048
    seq_len: int = 256
    slice_steps: int = 4
    feature_loss_weight: float = 1.0
    token_loss_weight: float = 0.1
    side_stream_max_slowdown: float = 0.05
    side_stream_max_batch: int = 8
    side_stream_probe_steps: int = 8
    side_stream_reprobe_steps: int = 256
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
