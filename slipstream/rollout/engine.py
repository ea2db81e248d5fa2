"""The native generation engine: schedule -> run -> postprocess, until every request is done."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from slipstream.kernels.decode_linear import timings_so_far
from slipstream.models.decoder import Decoder
from slipstream.rollout.block_manager import BlockManager
from slipstream.rollout.cuda_graph import captures_so_far
from slipstream.rollout.model_runner import LaunchedSteps, ModelRunner, StepFeatures
from slipstream.rollout.scheduler import ScheduledBatch, Scheduler
from slipstream.rollout.sequence import Sequence
from slipstream.rollout.spec.policy import PolicyConfig
from slipstream.rollout.spec.spec_runner import SpecRunner
from slipstream.rollout.spec.speculator import SpecConfig, Speculator
from slipstream.rollout.timeline import Timeline
from slipstream.rollout.types import Completion, Request, check_prompt_ids


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: size the cache from kv_cache_gb
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    chunk_size: int | None = None  # longest prefill chunk per sequence and step (None: token budget)
    max_model_len: int = 4096
    enable_prefix_sharing: bool = True
    prefill_skip_scale: float = 0.0  # BLASST skip-softmax in prefill steps (0: dense)
    decode_skip_scale: float = 0.0  # and in decode / verify steps
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (GPU only)
    max_graph_batch: int = 256  # largest decode batch a graph is captured for; larger ones run eagerly
    # Decode steps per graph replay while no sequence waits (GPU): each replay feeds its draws to
    # the next step on the device, so the host's per-step work is paid once per `decode_steps`,
    # and the next replay is launched before the host reads this one's (see Engine._decode_steps).
    # Tokens drawn after a sequence finishes are discarded (at most 2 * decode_steps - 1 per sequence).
    decode_steps: int = 4
    # Capture the graphs of every batch-size bucket when the engine starts (with speculation, the
    # verification graphs too), instead of the first time a rollout needs one: a capture (and the
    # projection timings its warm-up run does) stalls the rollout it happens in for tens of ms per
    # bucket, and with several ranks the step waits for whichever rank met a new bucket.
    capture_graphs_at_start: bool = True


def kv_blocks_for(decoder: Decoder, cfg: EngineConfig) -> int:
    if cfg.num_blocks:
        return cfg.num_blocks
    c = decoder.config
    bytes_per_block = 2 * c.num_layers * cfg.block_size * c.num_kv_heads * c.head_dim * decoder.embed.weight.element_size()
    return max(int(cfg.kv_cache_gb * 2**30 // bytes_per_block), 1)


class Engine:
    def __init__(self, decoder: Decoder, eos_token_ids: Iterable[int], cfg: EngineConfig | None = None, seed: int = 0,
                 capture_layers: tuple[int, ...] = (-1,), feature_sink: Callable[[StepFeatures], None] | None = None,
                 spec: SpecConfig | None = None, speculator: Speculator | None = None):
        """`feature_sink`, when given, receives the hidden states (`capture_layers`) of every step.
        `spec` turns on speculative decoding (suffix-tree drafts, lossless verification);
        `speculator` replaces the one `spec` would build (e.g. one that also drafts with a learned
        drafter), its config standing for `spec`."""
        self.cfg = cfg = cfg or EngineConfig()
        self.decoder = decoder.eval()
        num_blocks = kv_blocks_for(decoder, cfg)
        # A sequence can then always fit the cache alone: preemption never has to give up on one.
        max_model_len = min(cfg.max_model_len, num_blocks * cfg.block_size)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_sharing)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.chunk_size,
                                   eos_token_ids=eos_token_ids, max_model_len=max_model_len)
        self.runner = ModelRunner(decoder, num_blocks, cfg.block_size, seed, capture_layers, feature_sink,
                                  cfg.prefill_skip_scale, cfg.decode_skip_scale, cfg.cuda_graphs, max_model_len,
                                  min(cfg.max_graph_batch, cfg.max_num_seqs))
        self.stats = {"steps": 0, "preemptions": 0}
        if speculator is not None:
            spec = speculator.config
        elif spec is not None:
            speculator = Speculator(spec)
        self.speculator = speculator
        if speculator is not None:
            speculator.flush_features = self.runner.flush_features
        # Verification graphs only for the batch sizes that speculate.
        self.spec_runner = SpecRunner(self.runner, min(cfg.max_graph_batch, spec.policy.min_batch_for_off)) \
            if spec is not None else None
        self.timeline = Timeline()
        if cfg.capture_graphs_at_start and self.runner.graphs is not None:
            self.capture_graphs()
        self._one_time_work_at_begin = self._one_time_work()
        # decode steps launched and not yet read: (their sequences, the launch); see _decode_steps
        self._inflight: tuple[list[Sequence], LaunchedSteps] | None = None

    def capture_graphs(self) -> float:
        """Capture every bucket's decode graphs (the multi-step one the default decode path replays
        and the single-step one) and, when speculating, every verification graph; returns the
        seconds it took. Graphs made after the KV cache is released and allocated again are
        captured when first needed."""
        t0, made = time.perf_counter(), captures_so_far()
        K = self.cfg.decode_steps
        # several steps per replay only up to the block size (Engine._can_decode_steps)
        if 1 < K <= self.block_manager.block_size:
            self.runner.graphs.capture_all(K)
        # single steps: while prompts wait, near a sequence's limit, and a speculating engine's
        # steps that verify no draft (on 4 GPUs these bucket graphs were still captured mid-rollout)
        self.runner.graphs.capture_all(1)
        if self.spec_runner is not None:
            self.spec_runner.capture_all()
        self.stats["capture_s"] = time.perf_counter() - t0
        self.stats["graphs_at_start"] = captures_so_far() - made
        return self.stats["capture_s"]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Copy new weights (Hugging Face names) into the decoder in place; returns the seconds it took."""
        t0 = time.perf_counter()
        self._drain()  # steps in flight were drawn under the old weights: read them first
        with torch.no_grad():
            self.decoder.load_weights(named_tensors)
        self.block_manager.reset_prefix_cache()  # K/V cached under the old weights must not be reused
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - t0

    def release_cache(self) -> None:
        """Free the KV cache's memory (a colocated trainer needs it while it updates); cached prefixes
        are forgotten. `restore_cache` allocates it again before the next `generate`."""
        if self.scheduler.has_work():
            raise RuntimeError(f"release_cache() while {self.scheduler.num_running} running and "
                               f"{self.scheduler.num_waiting} waiting sequences still need the cache; "
                               "call it between generate() calls")
        self._drain()
        self.block_manager.reset_prefix_cache()
        self.runner.release_cache()
        if self.spec_runner is not None:
            self.spec_runner.release_graphs()  # they point into the cache
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore_cache(self) -> None:
        self.runner.allocate_cache()

    def sparsity(self) -> dict[str, float]:
        """Fraction of attention key tiles skipped per phase since the last call (skip-softmax only)."""
        return self.runner.sparsity(reset=True)

    def history_state(self) -> dict:
        """What the engine learned from past rollouts (the drafter's trees, the policy's bandit),
        JSON-serialisable, for a checkpoint; empty without speculation."""
        return {} if self.speculator is None else {"spec": self.speculator.state_dict()}

    def load_history_state(self, state: dict | None) -> None:
        """Restore `history_state` (None, or a state without speculation, changes nothing)."""
        if state and state.get("spec") is not None and self.speculator is not None:
            self.speculator.load_state_dict(state["spec"])

    def rollout_metrics(self, small_batch: int = 16) -> dict[str, float]:
        """Speculation and live-batch metrics of the last `generate` (see `Timeline.metrics`), and
        the one-time work it did: CUDA graphs captured and projection shapes timed."""
        graphs, timings = (now - then for now, then in zip(self._one_time_work(), self._one_time_work_at_begin))
        out = {"rollout/graphs_captured": float(graphs), "rollout/kernel_timings": float(timings)}
        if self.speculator is None:
            return {**out, **self.timeline.metrics(PolicyConfig().bucket_edges, small_batch)}
        return {**out, **self.timeline.metrics(self.speculator.policy.config.bucket_edges, small_batch),
                **self.speculator.metrics()}

    @staticmethod
    def _one_time_work() -> tuple[int, int]:
        return captures_so_far(), timings_so_far()

    def step(self) -> list[Sequence]:
        t0 = time.perf_counter()
        if self._inflight is not None:  # read the launched steps before anything looks at the sequences
            return self._decode_steps(t0)
        live = self.scheduler.num_running + self.scheduler.num_waiting
        drafts = self.speculator.propose(self.scheduler) if self.speculator is not None else None
        if not drafts and self._can_decode_steps():
            return self._decode_steps(t0)
        batch = self.scheduler.schedule(drafts)
        if batch.num_draft_tokens:  # verify the drafts: each sequence emits 1 + accepted tokens
            tokens, logprobs = self.spec_runner.run(batch, self.speculator.draft_probs(batch))
            finished = self.scheduler.postprocess_verified(batch, tokens, logprobs)
            self.spec_runner.emit_features(batch)  # of the kept positions only
        else:
            tokens, logprobs = self.runner.run(batch)
            finished = self.scheduler.postprocess(batch, tokens, logprobs)
        t1 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.observe(batch, live, t1 - t0, tokens if batch.num_draft_tokens else None)
        self.timeline.record(t0, t1, live, batch.num_emitted, batch.num_draft_tokens, batch.num_accepted,
                             batch.num_drafting_seqs)
        self.stats["steps"] += 1
        return finished

    def _can_decode_steps(self) -> bool:
        """Several decode steps per replay: only GPU decoding with nothing waiting, no top-k/top-p,
        room in the graphs' block tables and free blocks for every sequence's next tokens."""
        K, sch, runner = self.cfg.decode_steps, self.scheduler, self.runner
        if K <= 1 or sch.num_waiting or not sch.running or not runner.can_decode_steps:
            return False
        graphs, bm = runner.graphs, self.block_manager
        if len(sch.running) > graphs.max_batch or K > bm.block_size:
            return False
        limit = graphs.width * bm.block_size
        need = 0
        for seq in sch.running:
            if seq.is_prefilling or seq.params.truncates or seq.num_tokens + K - 1 > limit:
                return False
            need += bm.blocks_to_grow(seq, K - 1)
        return need <= bm.num_free_blocks

    def _can_chain(self, seqs: list[Sequence]) -> bool:
        """Whether the next replay of `seqs` may be launched before the host reads the one in
        flight: they are still all that runs, nothing waits, none is sure to end inside the
        replay in flight (by its length), there is room in the graphs' tables and free blocks
        for the next replay's tokens, and the speculator (if any) will not draft in the next step
        (else it must see every step to draft)."""
        K, sch, bm = self.cfg.decode_steps, self.scheduler, self.block_manager
        if sch.num_waiting or len(seqs) != sch.num_running or any(seq.is_finished for seq in seqs):
            return False
        limit = min(self.runner.graphs.width * bm.block_size, sch.max_model_len or 1 << 62)
        need = 0
        for seq in seqs:
            if seq.num_tokens + 2 * K > limit or seq.num_output_tokens + K >= seq.params.max_tokens:
                return False
            need += bm.blocks_to_grow(seq, 2 * K - 1)
        if need > bm.num_free_blocks:
            return False
        return self.speculator is None or not self.speculator.will_draft(len(seqs))

    def _decode_steps(self, t0: float, chain: bool = True) -> list[Sequence]:
        """`decode_steps` decode steps in one replay, applied in one pass per sequence; the
        timeline and the speculator's bandit still see one record per step.

        While the same sequences keep decoding, the next replay is launched (chained on the
        device) before this one's draws are read, so the GPU does not wait for the host between
        replays. If a sequence ends in this replay, its draws in the chained one are discarded,
        and no replay chains from there (its blocks are free again)."""
        K, sch, bm = self.cfg.decode_steps, self.scheduler, self.block_manager
        if self._inflight is None:
            running = list(sch.running)
            for seq in running:
                bm.may_append(seq, K - 1)  # slots for the K tokens the replay computes
            self._inflight = (running, self.runner.launch_decode_steps(running, K))
        seqs, launched = self._inflight
        self._inflight = None
        if chain and self._can_chain(seqs):
            for seq in seqs:
                bm.may_append(seq, 2 * K - 1)  # and for the chained replay's K after them
            self._inflight = (seqs, self.runner.launch_decode_steps(seqs, K, chained=True))
        if self.speculator is not None and launched.done is not None:
            # the host would only wait: the speculator's trees catch up meanwhile, in small units
            while not launched.done.query() and self.speculator.idle_work(len(seqs)):
                pass
        tokens, logprobs = self.runner.finish_decode_steps(launched)
        alive = [i for i, seq in enumerate(seqs) if not seq.is_finished]  # those ended before: discarded
        if len(alive) < len(seqs):
            seqs = [seqs[i] for i in alive]
            tokens = [[row[i] for i in alive] for row in tokens]
            logprobs = [[row[i] for i in alive] for row in logprobs]
        capture = bool(self.runner.capture_layers)
        if capture:
            first = [(seq.last_token, seq.num_tokens - 1) for seq in seqs]  # what the replay's first step fed
            before = [seq.num_output_tokens for seq in seqs]
        finished, live = sch.postprocess_steps(seqs, tokens, logprobs)
        if capture:
            self.runner.emit_step_features(launched, seqs, alive, first, tokens,
                                           [seq.num_output_tokens - n for seq, n in zip(seqs, before)])
        if self._inflight is not None and all(seq.is_finished for seq in seqs):
            self._inflight = None  # nothing to read there; the GPU finishes it before any later work
        if capture and self._inflight is None and 2 * self.runner.pending_feature_rows > self.runner.graphs.ring_size:
            # The rows wait in the graphs' ring: any kernel launched near the decode replays costs
            # them their overlap (PDL), so they are gathered only when a reader needs them (a
            # learned draft, a prefill or verification step, the rollout's end) or, as here, where
            # a chain ends with the ring half full, rather than between the next chain's replays.
            self.runner.flush_features()
        if finished and self.speculator is not None:
            self.speculator.finished(finished)
        t_prev, dt = t0, (time.perf_counter() - t0) / K
        for n in live:
            if not n:
                break  # every sequence finished: the remaining draws were discarded
            if self.speculator is not None:
                self.speculator.observe(ScheduledBatch(entries=[], block_size=sch.block_size, num_emitted=n), n, dt)
            self.timeline.record(t_prev, t_prev + dt, n, n, 0, 0, 0)
            self.stats["steps"] += 1
            t_prev += dt
        return finished

    def _abort(self) -> None:
        """After a failed step (or an interrupt): drop the call's sequences and what is in flight,
        so that the engine's cache and queues are empty for the next call."""
        if self._inflight is not None and self.runner.device.type == "cuda":
            try:  # let the replay in flight finish before the host reuses its pinned buffers
                torch.cuda.synchronize(self.runner.device)
            except Exception:  # noqa: BLE001 - the error being handled is the one to report
                pass
        self._inflight = None  # its draws are not read
        self.runner.drop_features()
        self.scheduler.abort_all()
        if self.speculator is not None:
            self.speculator.end(record=False)

    def _drain(self) -> None:
        """Read the decode steps in flight, launching no more."""
        if self._inflight is not None:
            self._decode_steps(time.perf_counter(), chain=False)

    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 history: bool = True) -> list[Completion]:
        """One Completion per sample (`params.n` per request), in request order.

        The first request that carries a seed reseeds the sampler, so a call is reproducible.
        `history=False`: the rollout does not feed what the engine learns from past rollouts (the
        drafter's windows), e.g. an evaluation on prompts that are never trained on.
        """
        check_prompt_ids(requests, self.runner.decoder.config.vocab_size)
        seed = next((r.params.seed for r in requests if r.params.seed is not None), None)
        if seed is not None:
            self.runner.reseed(seed)
        seqs = [s for r in requests for s in Sequence.from_request(r)]
        preempted_before = self.scheduler.num_preemptions
        self.scheduler.add(seqs)
        self.timeline.begin()
        self._one_time_work_at_begin = self._one_time_work()
        if self.speculator is not None:
            self.speculator.begin(seqs, record=history)
        try:
            while self.scheduler.has_work():
                finished = self.step()
                if progress is not None and finished:
                    progress(len(finished))
        except BaseException:
            self._abort()
            raise
        self.runner.flush_features()  # the sink has every captured row when the call returns
        if self.speculator is not None:
            self.speculator.end(record=history)
        self.stats["preemptions"] += self.scheduler.num_preemptions - preempted_before
        return [s.to_completion() for s in seqs]
