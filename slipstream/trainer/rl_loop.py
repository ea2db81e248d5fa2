"""The RL loop, top to bottom: prompts -> rollout -> rewards -> advantages -> update -> sync.

Everything else is a helper this file calls.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slipstream.config import (LEARNED_SPEC_KINDS, ConfigError, SlipstreamConfig, drafter_config, engine_spec_config,
                               source_policy_config)
from slipstream.models import load_model_and_tokenizer
from slipstream.models.loading import resolve_model
from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.hf_backend import HFRolloutBackend
from slipstream.rollout.types import Request, SamplingParams
from slipstream.tasks import Problem, build_task
from slipstream.telemetry import MetricsLogger, progress_bar, write_report
from slipstream.telemetry.cuda_memory import CudaMemoryMeter
from slipstream.telemetry.gc_time import GCTime, frozen_startup_heap
from slipstream.telemetry.step_profiler import StepProfiler, phase
from slipstream.trainer.batch import build_batch
from slipstream.trainer.checkpoint import TrainState, latest_checkpoint, load_drafter_state, load_rollout_state
from slipstream.trainer.distributed import (
    DistContext,
    global_metrics,
    init_distributed,
    rank_zero_logger,
    shard_groups,
    shutdown_distributed,
)
from slipstream.trainer.parts import build_parts
from slipstream.trainer.rewards import RewardScorer
from slipstream.trainer.sharded_checkpoint import load_train_checkpoint, resume_path, save_train_checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the checkpoint to resume from."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(name)


class PromptStream:
    """Endless, seeded, reshuffled-every-epoch stream of problems; its position is checkpointed."""

    def __init__(self, problems: list[Problem], seed: int, epoch: int = 0, position: int = 0):
        self.problems, self.seed, self.epoch, self.position = problems, seed, epoch, position

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.problems), generator=g).tolist()

    def take(self, k: int) -> list[Problem]:
        out, order = [], self._order()
        while len(out) < k:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            out.append(self.problems[order[self.position]])
            self.position += 1
        return out


def build_rollout(cfg: SlipstreamConfig, model, tokenizer, device: torch.device):
    return build_rollout_and_drafter(cfg, model, tokenizer, device)[0]


def build_rollout_and_drafter(cfg: SlipstreamConfig, model, tokenizer, device: torch.device, world_size: int = 1):
    """The rollout backend, and the learned drafter it drafts with (None without one)."""
    rc = cfg.rollout
    if rc.backend == "hf":
        return HFRolloutBackend(model, tokenizer, batch_size=rc.batch_size), None
    # The engine keeps its own copy of the weights (bf16 on GPU) and receives the trainer's after every update.
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                     device=device)
    dense = cfg.attention.kind == "dense"
    ecfg = EngineConfig(block_size=rc.block_size, kv_cache_gb=rc.kv_cache_gb, max_num_seqs=rc.max_num_seqs,
                        max_num_batched_tokens=rc.max_num_batched_tokens, max_model_len=rc.max_model_len,
                        cuda_graphs=rc.cuda_graphs, decode_steps=rc.decode_steps,
                        capture_graphs_at_start=rc.capture_graphs_at_start,
                        prefill_skip_scale=0.0 if dense else cfg.attention.prefill_scale,
                        decode_skip_scale=0.0 if dense else cfg.attention.decode_scale)
    spec = engine_spec_config(cfg.spec, cfg.trainer.seed)
    if cfg.spec.kind not in LEARNED_SPEC_KINDS:
        if cfg.drafter.kind != "off":
            raise ConfigError(f"drafter={cfg.drafter.kind} with spec={cfg.spec.kind}: the engine would never draft "
                              f"with the learned drafter; use spec=drafter or spec=both (or drafter=off)")
        return Engine(decoder, [tokenizer.eos_token_id], ecfg, seed=cfg.trainer.seed, spec=spec), None
    from slipstream.drafter import RankBubble, RunDrafter

    dc = cfg.drafter
    online = dc.kind == "online"
    drafter = RunDrafter(decoder, drafter_config(dc, cfg.trainer.seed), online, dc.warm_start,
                         side_stream=dc.side_stream and world_size == 1,
                         rank_bubble=RankBubble.from_env() if online and world_size > 1 else None,
                         max_seqs=rc.max_num_seqs,
                         graph_batch=min(rc.max_num_seqs, cfg.spec.min_batch_for_off) if device.type == "cuda" else 0)
    engine = drafter.build_engine(decoder, [tokenizer.eos_token_id], ecfg, cfg.trainer.seed, spec,
                                  source_policy_config(cfg.spec, cfg.trainer.seed))
    return engine, drafter


def encode_prompt(tokenizer, problem: Problem, system_prompt: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": problem.question}
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def evaluate(engine, tokenizer, task, problems: list[Problem], cfg: SlipstreamConfig, show: bool,
             ctx: DistContext) -> dict:
    problems = problems[ctx.rank :: ctx.world_size]  # every rank evaluates its share
    params = SamplingParams(n=1, temperature=cfg.rollout.eval_temperature, max_tokens=cfg.rollout.eval_max_tokens,
                            seed=cfg.trainer.seed)
    reqs = [Request(encode_prompt(tokenizer, p, cfg.task.system_prompt), params, p.uid, p.uid) for p in problems]
    bar = progress_bar(len(reqs), "eval", enabled=show)
    comps = engine.generate(reqs, progress=bar.update, history=False)  # held-out prompts shape no drafts
    bar.close()
    texts = tokenizer.batch_decode([c.tokens for c in comps], skip_special_tokens=True)
    scores = [task.reward(p, t) for p, t in zip(problems, texts)]
    n, correct, length = ctx.all_reduce_sum(torch.tensor([len(scores), sum(scores),
                                                          sum(len(c.tokens) for c in comps)], dtype=torch.float64))
    return {"eval/accuracy": float(correct / n.clamp(min=1)), "eval/response_length": float(length / n.clamp(min=1))}


def train(cfg: SlipstreamConfig) -> dict:
    tc = cfg.trainer
    # One process per device under torchrun (rank 0 writes the logs and reports), or one alone.
    ctx = init_distributed(tc.device, tc.dist_timeout_s, need_group=tc.backend != "local")
    run_dir = Path(tc.run_dir or f"runs/{cfg.recipe}")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the same initial weights and data order on every rank
    device = pick_device(tc.device) if ctx.world_size == 1 and tc.backend == "local" else ctx.device

    task = build_task(cfg.task)
    train_problems, eval_problems = task.train_problems(), task.eval_problems()
    # The trainer keeps float32 master weights; on CUDA the forward passes run under bf16 autocast.
    model_cfg = dataclasses.replace(cfg.model, dtype="float32") if cfg.model.dtype == "auto" else cfg.model
    if ctx.local_rank == 0:  # one process per node fills the model cache (pull, build) before the others read it
        resolve_model(model_cfg.name, tiny_hidden_size=model_cfg.tiny_hidden_size, tiny_layers=model_cfg.tiny_layers)
    ctx.barrier()
    model, tokenizer = load_model_and_tokenizer(model_cfg, device)
    # from the full weights, before they are sharded
    engine, drafter = build_rollout_and_drafter(cfg, model, tokenizer, device, ctx.world_size)
    if ctx.is_main and isinstance(engine, Engine) and "capture_s" in engine.stats:
        print(f"rollout engine: {engine.stats['graphs_at_start']} CUDA graphs captured in "
              f"{engine.stats['capture_s']:.1f} s")
    parts = build_parts(cfg, model, ctx)
    actor, critic = parts.actor, parts.critic
    scorer = RewardScorer(task, cfg.reward, device)

    state = TrainState(step=0, epoch=0, position=0)
    ckpt_root = run_dir / "checkpoints"
    resume_from = resume_path(tc.resume, ckpt_root, ctx)
    if resume_from is not None:
        state = load_train_checkpoint(resume_from, parts.checkpointed, ctx)
        if isinstance(engine, Engine):  # the engine generates with the restored weights
            engine.load_weights(actor.backend.named_full_parameters())
            engine.load_history_state(load_rollout_state(resume_from, ctx.rank))  # speculation trees
        drafter_state = load_drafter_state(resume_from, ctx.rank) if drafter is not None else None
        if drafter_state is not None:
            drafter.load_state_dict(drafter_state)
        if ctx.is_main:
            print(f"resumed from {resume_from} (step {state.step})")
    stream = PromptStream(train_problems, tc.seed, state.epoch, state.position)
    prompt_cache: dict[str, list[int]] = {}

    logger = rank_zero_logger(ctx, lambda: MetricsLogger(run_dir, cfg.logger,
                                                         OmegaConf.to_container(OmegaConf.structured(cfg)),
                                                         run_name=run_dir.name, resume=resume_from is not None))
    if resume_from is not None:
        logger.truncate_after(state.step)
    show = cfg.logger.progress and ctx.is_main
    colocate = tc.offload_during_rollout and device.type == "cuda" and isinstance(engine, Engine)
    profiler = StepProfiler(tc.profile_steps, run_dir / "profile", ctx.rank, device)
    summary: dict = {}
    # what lives for the whole run is walked by no full collection while it trains
    with logger, frozen_startup_heap(), GCTime() as gc_time:
        if state.step == 0:
            t0 = time.perf_counter()
            with parts.generating(engine, colocate):
                before = evaluate(engine, tokenizer, task, eval_problems, cfg, show, ctx)
            before["time/eval"] = time.perf_counter() - t0
            logger.log(0, before)
            if ctx.is_main:
                print(f"held-out accuracy before training: {before['eval/accuracy']:.3f} "
                      f"({len(eval_problems)} problems)")
        memory = CudaMemoryMeter(device)
        while state.step < tc.steps:
            step = state.step + 1
            t_step, gc_step = time.perf_counter(), gc_time.seconds
            with profiler.step(step):  # `trainer.profile_steps`: a trace of this step, else nothing
                # 1. prompts: whole GRPO groups, this rank's share of them
                problems = shard_groups(stream.take(tc.prompts_per_step), ctx)
                params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                        top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_tokens,
                                        seed=tc.seed * 1_000_003 + step + 7_919 * ctx.rank)
                requests = []
                for p in problems:
                    if p.uid not in prompt_cache:
                        prompt_cache[p.uid] = encode_prompt(tokenizer, p, cfg.task.system_prompt)
                    requests.append(Request(prompt_cache[p.uid], params, p.uid, f"{step}-{p.uid}"))
                # 2. rollout (its features are the learned drafter's data of this step)
                if drafter is not None:
                    drafter.start_step(step)
                t0 = time.perf_counter()
                gc_rollout = gc_time.seconds
                # optimizer state off the GPU while the KV cache is in use
                with phase("rollout"), parts.generating(engine, colocate):
                    bar = progress_bar(len(requests) * params.n, f"step {step} rollout", enabled=show)
                    completions = engine.generate(requests, progress=bar.update)
                    bar.close()
                t_rollout = time.perf_counter() - t0
                native = isinstance(engine, Engine)
                spec_metrics, timeline = (engine.rollout_metrics(), engine.timeline.to_columns()) if native else ({}, None)
                spec_metrics["rollout/gc_s"] = gc_time.seconds - gc_rollout
                sparsity = engine.sparsity() if cfg.attention.kind == "blasst" else {}
                if drafter is not None:  # how well it predicts the rollout, then the bubble: ranks done early train
                    drafter.evaluate_rollout(step)
                    drafter.rank_idle(step)
                # 3. rewards (the learned drafter trains meanwhile)
                t0 = time.perf_counter()
                by_uid = {p.uid: p for p in problems}
                texts = tokenizer.batch_decode([c.tokens for c in completions], skip_special_tokens=True)
                prompt_texts = {p.uid: tokenizer.decode(prompt_cache[p.uid]) for p in problems}

                def score():
                    return scorer([by_uid[c.group_id] for c in completions],
                                  [prompt_texts[c.group_id] for c in completions], texts)
                with phase("reward"):
                    rewards, reward_metrics = drafter.train_while(score) if drafter is not None else score()
                t_reward = time.perf_counter() - t0
                t0 = time.perf_counter()
                if drafter is not None:  # then its steps of this RL step, and the new weights swap in
                    drafter.train_after_rollout(cfg.drafter.train_steps_after_rollout)
                    drafter.publish()
                t_drafter = time.perf_counter() - t0
                # 4. advantages: per sequence from the rewards, or per token from PPO's critic
                batch = build_batch(completions, rewards, tokenizer.pad_token_id)
                if critic is not None:
                    advantages, old_values, returns = critic.advantages(batch)
                else:
                    advantages = actor.advantages(batch)
                # 5. update
                t0 = time.perf_counter()
                bar = progress_bar(batch.size, f"step {step} update", enabled=show)
                try:
                    with phase("update"):
                        metrics = actor.update(batch, advantages, step - 1, cfg.rollout.max_tokens,
                                               on_micro_batch=bar.update)
                        if critic is not None:
                            metrics.update(critic.update(batch, old_values, returns))
                except FloatingPointError as e:
                    newest = latest_checkpoint(ckpt_root)
                    raise TrainingError(f"{e}; the run stops without checkpointing that step. Newest checkpoint: "
                                        f"{newest or 'none yet'} (resume with trainer.resume=auto and, e.g., a lower "
                                        f"trainer.lr)") from None
                finally:
                    bar.close()
                t_update = time.perf_counter() - t0
                # 6. weight sync into the engine (the HF backend shares the trainer's module) and bookkeeping
                with phase("sync"):
                    t_sync = (engine.load_weights(actor.backend.named_full_parameters()) if isinstance(engine, Engine)
                              else 0.0)
            state = TrainState(step=step, epoch=stream.epoch, position=stream.position)
            rollout_metrics, all_lengths, all_rewards = global_metrics(
                ctx, completions, rewards, batch, _mixed_group_fraction(batch.group_ids, torch.tensor(rewards)),
                t_rollout, t_update)
            metrics.update(rollout_metrics)
            metrics.update({
                "time/rollout": t_rollout, "time/reward": t_reward, "time/update": t_update, "time/sync": t_sync,
                "time/drafter": t_drafter,
                **ctx.mean_over_ranks(reward_metrics), **spec_metrics,
                **{f"attention/sparsity_{phase}": v for phase, v in sparsity.items()},
            })
            if drafter is not None:
                metrics.update(drafter.log(step))
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                t0 = time.perf_counter()
                with parts.generating(engine, colocate):
                    metrics.update(evaluate(engine, tokenizer, task, eval_problems, cfg, show, ctx))
                metrics["time/eval"] = time.perf_counter() - t0
            if step == tc.steps:
                t0 = time.perf_counter()
                with parts.generating(engine, colocate):
                    after = evaluate(engine, tokenizer, task, eval_problems, cfg, show, ctx)
                metrics.update(after)
                metrics["time/eval"] = time.perf_counter() - t0
            metrics["time/step"] = time.perf_counter() - t_step
            metrics["time/gc"] = gc_time.seconds - gc_step  # in Python's garbage collector, this rank
            metrics.update(memory.step())  # this rank's
            logger.log(step, metrics)
            logger.log_rollouts(step, all_lengths, all_rewards, timeline=timeline)
            if (tc.save_every and step % tc.save_every == 0) or step == tc.steps:
                save_train_checkpoint(ckpt_root, state, parts.checkpointed, ctx, keep=tc.keep_checkpoints,
                                      rollout_state=engine.history_state() if native else None,
                                      drafter_state=drafter.state_dict() if drafter is not None else None)
            summary = metrics
    shutdown_distributed()
    if not ctx.is_main:
        return {"run_dir": str(run_dir), **summary}
    first = _first_eval(run_dir)
    if "eval/accuracy" in summary:
        print(f"held-out accuracy: before {first:.3f} -> after {summary['eval/accuracy']:.3f}")
    if cfg.logger.jsonl:
        report = write_report(run_dir)
        print(f"report: {report[-1]}")
    return {"run_dir": str(run_dir), "eval_before": first, **summary}


def _mixed_group_fraction(group_ids: torch.Tensor, rewards: torch.Tensor) -> float:
    """Fraction of groups with mixed rewards: the only ones that carry a GRPO learning signal."""
    mixed = [float(rewards[group_ids == g].max() > rewards[group_ids == g].min()) for g in group_ids.unique()]
    return sum(mixed) / len(mixed)


def _first_eval(run_dir: Path) -> float | None:
    from slipstream.telemetry import read_jsonl

    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if "eval/accuracy" in row:
            return row["eval/accuracy"]
    return None
