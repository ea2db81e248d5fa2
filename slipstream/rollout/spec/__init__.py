""""""

from slipstream.rollout.spec.verify import VerifyResult, verify_drafts

__all__ = ["VerifyResult", "verify_drafts"]
