"""Speculative decoding: draft proposers and lossless verification against the target."""

from slipstream.rollout.spec.verify import VerifyResult, verify_drafts

__all__ = ["VerifyResult", "verify_drafts"]
