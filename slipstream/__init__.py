"""slipstream: RL post-training for reasoning LLMs, built around a fast rollout engine."""

__version__ = "0.1.0"
