"""The rollout boundary: what the trainer asks of a generation backend and what comes back."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """vLLM-style sampling parameters.

    The logprob returned for each sampled token is taken under the distribution it was actually
    sampled from: logits / temperature, then top-k and top-p truncation, renormalised. At
    temperature 0 (greedy) it is the log-softmax of the raw logits.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        bad = [t for t in self.stop_token_ids if not _is_int(t) or t < 0]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids must be token ids (ints >= 0), got {bad}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"SamplingParams.logprobs is a bool here (the log-prob of every sampled token "
                             f"is returned; top-N alternatives are not), got {self.logprobs!r}")

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p cuts the distribution (the fused sampler and graphs cannot)."""
        return self.top_p < 1.0 or self.top_k > 0


@dataclass
class Request:
    """One prompt to sample `params.n` completions of; `group_id` names the prompt (GRPO group)."""

    prompt_ids: list[int]
    params: SamplingParams
    group_id: str
    request_id: str


def check_prompt_ids(requests, vocab_size: int) -> None:
    """Refuse prompts with token ids outside [0, vocab_size), naming the request: on a GPU such an
    id would fault the embedding lookup and take the whole process's CUDA context with it."""
    for r in requests:
        ids = r.prompt_ids
        if len(ids) and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise ValueError(f"request {r.request_id!r}: prompt token id {bad} is outside the model's "
                             f"vocabulary [0, {vocab_size})")


@dataclass
class Completion:
    request_id: str
    group_id: str
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]  # sampling logprob of each token in `tokens`
    finish_reason: str  # "stop" (a stop token was sampled), "length", or "abort" (generate failed)
    timings: dict = field(default_factory=dict)
