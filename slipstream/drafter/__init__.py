"""The learned drafter: an EAGLE-style model over the target's hidden states, trained in bubbles."""

from slipstream.drafter.bubble_trainer import (BubbleTimeout, BubbleTrainer, RankBubble, SideStreamTrainer,
                                               SlowdownGate, average_drafter, broadcast_drafter, drafter_loss)
from slipstream.drafter.config import DrafterConfig
from slipstream.drafter.context import ContextWindows
from slipstream.drafter.draft_graphs import DraftGraphs
from slipstream.drafter.engine_drafting import DraftingSpeculator
from slipstream.drafter.feature_buffer import DrafterBatch, FeatureBuffer, aligned_pairs
from slipstream.drafter.metrics import BubbleReport, DrafterMetrics
from slipstream.drafter.model import Draft, DraftContext, Drafter, TargetHead
from slipstream.drafter.run_drafter import RunDrafter
from slipstream.drafter.source_policy import (SOURCES, CombinedDraft, SourcePolicy, SourcePolicyConfig,
                                              combine_drafts)
from slipstream.drafter.swap import DrafterSlot

__all__ = ["SOURCES", "BubbleReport", "BubbleTimeout", "BubbleTrainer", "CombinedDraft", "ContextWindows", "Draft",
           "DraftContext", "DraftGraphs", "Drafter", "DrafterBatch", "DrafterConfig", "DrafterMetrics", "DrafterSlot",
           "DraftingSpeculator", "FeatureBuffer", "RankBubble", "RunDrafter", "SideStreamTrainer", "SlowdownGate",
           "SourcePolicy", "SourcePolicyConfig", "TargetHead", "aligned_pairs", "average_drafter", "broadcast_drafter",
           "combine_drafts", "drafter_loss"]
