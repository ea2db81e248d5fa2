"""Rollout: the generation boundary (SamplingParams, Request, Completion) and its backends."""

from slipstream.rollout.hf_backend import HFRolloutBackend
from slipstream.rollout.types import Completion, Request, SamplingParams

__all__ = ["Completion", "HFRolloutBackend", "Request", "SamplingParams"]
