"""Speculative decoding: draft proposers and lossless verification against the target."""

from slipstream.rollout.spec.policy import PolicyConfig, SpecPolicy
from slipstream.rollout.spec.speculator import SpecConfig, Speculator
from slipstream.rollout.spec.suffix_tree import (SuffixConfig, SuffixDraft, SuffixDrafter,
                                                 SuffixNode, SuffixTree)
from slipstream.rollout.spec.verify import VerifyResult, verify_drafts

__all__ = ["PolicyConfig", "SpecConfig", "SpecPolicy", "Speculator", "SuffixConfig", "SuffixDraft", "SuffixDrafter",
           "SuffixNode", "SuffixTree", "VerifyResult", "verify_drafts"]
