"""One sample being generated: its tokens, its place in the paged KV cache, its status and timings.

A sequence's tokens are `prompt_ids + output_ids`. `num_cached_tokens` of them (a prefix) have
their K/V in the cache, in the blocks of `block_table`; the rest are computed by the next steps.
While decoding, exactly one token (the last sampled one) is uncached. After a preemption the
cache is dropped (`num_cached_tokens = 0`, no blocks) and the whole context, generated tokens
included, is prefilled again: nothing sampled is lost.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from slipstream.rollout.types import Completion, Request, SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # holds no blocks; queued for (re)admission
    RUNNING = "running"  # holds blocks for all its tokens; prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    group_id: str = ""
    sample_index: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length" once finished ("abort": dropped unfinished)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        self.prompt_ids = list(self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError(f"sequence {self.seq_id} (request {self.request_id!r}) has an empty prompt")

    @classmethod
    def from_request(cls, request: Request) -> list[Sequence]:
        """The `request.params.n` samples of one request, sharing its prompt."""
        arrival = time.perf_counter()
        return [
            cls(list(request.prompt_ids), request.params, request.request_id, request.group_id, i,
                arrival_time=arrival)
            for i in range(request.params.n)
        ]

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens whose K/V still have to be computed (1 while decoding)."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without building the whole list."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        """Blocks holding `num_tokens` (default: all current tokens) of this sequence."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return -(-n // block_size)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token is uncached (a prompt, a chunk left, or a recompute)."""
        return self.num_uncached_tokens > 1

    def append_token(self, token_id: int, logprob: float | None = None) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(int(token_id))
        self.output_logprobs.append(float("nan") if logprob is None else float(logprob))

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()

    def to_completion(self) -> Completion:
        timings = {"num_preemptions": self.num_preemptions}
        if self.first_token_time is not None:
            timings["ttft_seconds"] = self.first_token_time - self.arrival_time
        if self.finish_time is not None:
            timings["latency_seconds"] = self.finish_time - self.arrival_time
        return Completion(
            request_id=self.request_id,
            group_id=self.group_id,
            prompt_ids=list(self.prompt_ids),
            tokens=list(self.output_ids),
            logprobs=list(self.output_logprobs),
            finish_reason=self.finish_reason or "length",
            timings=timings,
        )

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, sample={self.sample_index}, "
                f"status={self.status.value}, tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
                f"cached={self.num_cached_tokens}, blocks={len(self.block_table)})")
