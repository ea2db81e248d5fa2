"""The learned drafter: an EAGLE-style model over the target's hidden states, trained in bubbles."""

from slipstream.drafter.bubble_trainer import (BubbleTrainer, RankBubble, SideStreamTrainer, SlowdownGate,
                                               average_drafter, broadcast_drafter, drafter_loss)
from slipstream.drafter.config import DrafterConfig
from slipstream.drafter.feature_buffer import DrafterBatch, FeatureBuffer, aligned_pairs
from slipstream.drafter.metrics import BubbleReport, DrafterMetrics
from slipstream.drafter.model import Draft, DraftContext, Drafter, TargetHead
from slipstream.drafter.swap import DrafterSlot

__all__ = ["BubbleReport", "BubbleTrainer", "Draft", "DraftContext", "Drafter", "DrafterBatch", "DrafterConfig",
           "DrafterMetrics", "DrafterSlot", "FeatureBuffer", "RankBubble", "SideStreamTrainer", "SlowdownGate",
           "TargetHead", "aligned_pairs", "average_drafter", "broadcast_drafter", "drafter_loss"]
