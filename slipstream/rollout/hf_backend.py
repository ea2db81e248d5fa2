"""Batched HF `generate` rollout backend: the baseline every faster engine is measured against.

HF applies its own sampling warpers after any custom logits processor, so the sampling
distribution would be invisible to us. Instead we ask HF for plain multinomial sampling
(temperature 1, no top-k/top-p) and apply temperature, top-k and top-p ourselves in a processor
that also records the log-probability of the token HF then samples from exactly that distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from slipstream.rollout.sampler import shape_logits
from slipstream.rollout.types import Completion, Request, SamplingParams, check_prompt_ids


def apply_sampling_params(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits of the distribution tokens are drawn from under `params` (the engine's sampler rules)."""
    n = logits.shape[0]
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype, device=logits.device)  # noqa: E731
    return shape_logits(logits, full(params.temperature, torch.float32), full(params.top_p, torch.float32),
                        full(params.top_k, torch.long))


class _SamplingProcessor(LogitsProcessor):
    """Shapes logits per SamplingParams and keeps the log-softmax row until the token is known."""

    def __init__(self, params: SamplingParams, prompt_len: int):
        self.params = params
        self.prompt_len = prompt_len
        self.pending: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def collect(self, input_ids: torch.Tensor) -> None:
        if self.pending is not None:
            token = input_ids[:, -1:]
            self.logprobs.append(self.pending.gather(-1, token).squeeze(-1))
            self.pending = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.collect(input_ids)
        shaped = apply_sampling_params(scores, self.params)
        self.pending = shaped.log_softmax(-1)
        return shaped


class HFRolloutBackend:
    """Generates completions with `model.generate`, `batch_size` sequences at a time."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_default = [tokenizer.eos_token_id]

    @torch.no_grad()
    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 history: bool = True) -> list[Completion]:
        """One Completion per sample: requests with params.n = k yield k completions, in order.
        `history` is the engine's interface; this backend learns nothing from past rollouts."""
        check_prompt_ids(requests, self.model.get_input_embeddings().num_embeddings)
        flat = [(req, i) for req in requests for i in range(req.params.n)]
        # Requests with equal params batch together; order of results follows `requests`.
        by_params: dict[SamplingParams, list[int]] = {}
        for idx, (req, _) in enumerate(flat):
            by_params.setdefault(req.params, []).append(idx)
        results: dict[int, Completion] = {}
        for params, idxs in by_params.items():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                for idx, comp in zip(chunk, self._generate_batch([flat[i][0] for i in chunk], params)):
                    results[idx] = comp
                if progress is not None:
                    progress(len(chunk))
        return [results[i] for i in range(len(flat))]

    def _generate_batch(self, reqs: list[Request], params: SamplingParams) -> list[Completion]:
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for row, r in enumerate(reqs):  # left padding
            ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids) :] = 1
        stop_ids = sorted(set(params.stop_token_ids) | set(self.stop_default))  # as the native engine
        proc = _SamplingProcessor(params, width)
        gen_cfg = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=params.temperature > 0,
            temperature=1.0,
            top_k=0 if params.temperature > 0 else None,
            top_p=1.0,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            use_cache=True,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            seqs = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([proc]),
            )
        finally:
            self.model.train(was_training)
        proc.collect(seqs)
        elapsed = time.perf_counter() - t0
        new = seqs[:, width:].cpu()
        logprobs = torch.stack(proc.logprobs, dim=1).cpu() if proc.logprobs else torch.zeros(len(reqs), 0)
        comps = []
        for row, r in enumerate(reqs):
            toks = new[row].tolist()
            finish = "length"
            for j, t in enumerate(toks):
                if t in stop_ids:
                    toks = toks[: j + 1]
                    finish = "stop"
                    break
            comps.append(
                Completion(
                    request_id=r.request_id,
                    group_id=r.group_id,
                    prompt_ids=list(r.prompt_ids),
                    tokens=toks,
                    logprobs=logprobs[row, : len(toks)].tolist(),
                    finish_reason=finish,
                    timings={"batch_seconds": elapsed},
                )
            )
        return comps
