"""Typed configuration: one dataclass per hydra config group, registered in hydra's ConfigStore.

The YAML files under conf/ and recipes/ fill these schemas; anything that does not fit (an unknown
key, a value of the wrong type, a choice that does not exist) is reported at start by
`validate()` or by the CLI, naming the key and the valid choices.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A user mistake in the configuration; the CLI prints it without a traceback."""


@dataclass
class ModelConfig:
    # A registered name (`slipstream models list`), a local HF directory, or a hub id.
    name: str = "smollm2-135m-instruct"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    gradient_checkpointing: bool = False
    # Used by the tiny randomly initialised model only (name: tiny-random).
    tiny_hidden_size: int = 64
    tiny_layers: int = 2


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # arithmetic | gsm8k
    seed: int = 0
    num_train: int = 2000
    num_eval: int = 64
    # Appended to every question: tells the model how to present its final answer.
    instruction: str = "Think step by step, then give the final answer on the last line as '#### <number>'."
    system_prompt: str | None = None
    answer_format: str = "flexible"  # strict: only '#### N' counts; flexible: else the last number
    # arithmetic: difficulty knobs. Steps follow a geometric law (mean ~ 1/step_p) clipped to
    # [min_steps, max_steps]: most problems are short, a few are long (the long tail).
    min_steps: int = 1
    max_steps: int = 8
    step_p: float = 0.5
    max_operand: int = 20
    operations: str = "+-*"
    style: str = "words"  # words: "Start with 7. Add 5, then ..."; expression: "What is (7 + 5) * 3?"
    # gsm8k: local files (jsonl or parquet with `question` and `answer` ending in '#### N').
    path: str | None = None
    eval_path: str | None = None
    eval_fraction: float = 0.1  # held out from `path` when no `eval_path` is given


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    advantage: str = "grpo"  # key of trainer.algorithms.ADVANTAGE_ESTIMATORS
    policy_loss: str = "clipped"  # key of trainer.algorithms.POLICY_LOSSES
    loss_agg: str = "seq-mean-token-mean"  # seq-mean-token-mean (GRPO) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr.GRPO)
    norm_adv_by_std: bool = True  # GRPO: True; Dr.GRPO: False
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    kl_coef: float = 0.0  # > 0 loads a frozen reference and adds the k3 KL estimator
    tis: bool = True  # truncated importance sampling for rollout/trainer mismatch
    tis_cap: float = 2.0
    # PPO (advantage: gae): a critic with the policy's architecture and a value head.
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda: 1 is the Monte-Carlo return, 0 the one-step TD error
    value_clip: float = 0.2  # value-clipping range around the values the returns were computed with (0: off)
    critic_lr: float = 1.0e-5


@dataclass
class RolloutConfig:
    backend: str = "hf"
    n: int = 8  # samples per prompt (GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    batch_size: int = 64  # sequences generated together
    eval_temperature: float = 0.0
    eval_max_tokens: int = 256
    # native engine: paged KV cache and continuous batching
    block_size: int = 16
    kv_cache_gb: float = 1.0  # memory for the KV cache
    max_num_seqs: int = 256  # sequences decoding together
    max_num_batched_tokens: int = 4096  # tokens per engine step (prefill chunks + decodes)
    max_model_len: int = 4096  # prompt + response cap
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (GPU)
    decode_steps: int = 4  # decode steps per graph replay while no sequence waits (GPU)
    capture_graphs_at_start: bool = True  # every batch size's graphs before the first rollout (GPU)


@dataclass
class AttentionConfig:
    # dense, or blasst: skip-softmax (arXiv 2512.12087) in the native engine. Not lossless: the
    # rollout/trainer mismatch it causes is logged and corrected by truncated importance sampling.
    kind: str = "dense"
    # Threshold lambda = scale / context length: a key tile is skipped when its scores are all
    # below the running max + ln(lambda). Separate scales for prefill and decode steps.
    prefill_scale: float = 0.0
    decode_scale: float = 0.0


@dataclass
class SpeculationConfig:
    # off, or lossless speculative decoding in the native engine with drafts from: suffix: a suffix
    # tree over recent rollouts of the same prompt, its group's live outputs and its own text;
    # drafter: the learned drafter (drafter=frozen|online); both: either, chosen per step and
    # request (the draft expected to be accepted longer).
    kind: str = "off"
    # drafter/both: the draft sources a bandit per live-batch bucket picks from by measured
    # tokens/s, "none" first (empty: [none, drafter] for drafter, [none, suffix, drafter, both] for both).
    sources: list[str] = field(default_factory=list)
    # The drafter: a prompt's window of the last `window_steps` rollouts (RL steps), suffixes up
    # to `max_depth` tokens; a draft is at most min(cap, alpha * match length) tokens and stops
    # before its probability under the trees' counts falls below `min_token_prob`.
    window_steps: int = 4
    max_depth: int = 64
    # The same for the trees of the step's live outputs (own, siblings), indexed token by token
    # while decoding: each token costs about this many node updates per tree.
    live_max_depth: int = 24
    cap: int = 15
    alpha: float = 1.0
    min_token_prob: float = 0.1
    max_tokens_per_prompt: int = 32768
    max_prompts: int = 256
    # The policy: no drafts while `min_batch_for_off` or more sequences are live; below, a bandit
    # per live-batch bucket picks the draft length (an arm) by measured tokens/s.
    min_batch_for_off: int = 32
    bucket_edges: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    draft_lens: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 15])
    max_step_draft_tokens: int = 128
    long_boost: float = 2.0
    num_length_classes: int = 3
    epsilon: float = 0.1
    guard_margin: float = 0.03
    # exploring arms measured slower than no speculation costs at most this fraction of its speed
    explore_cost: float | None = 0.01  # null: explore every arm alike


@dataclass
class DrafterSettings:
    """Settings of the drafter model, its feature buffer and its training in bubbles.

    Model: `capture_layer` is the target layer whose residual stream feeds the drafter (the
    decoder's capture convention: -1 is the last layer, before the final norm); `window` is how
    many earlier positions the drafter's attention sees, in training and drafting alike;
    `intermediate_size` 0 takes the target's MLP width. `max_draft_len` is the longest chain.

    Buffer: at most `buffer_tokens` token rows, none older than `buffer_max_age` RL steps, kept in
    `buffer_storage` (device: the target's device; pinned: page-locked host memory filled by
    asynchronous copies; cpu: plain host memory).

    Training: AdamW at `lr`; each optimizer step sees about `batch_tokens` aligned positions, cut
    into pieces of at most `seq_len` packed into rows; `slice_steps` optimizer steps form one
    preemptible slice (the stop condition is checked between slices). The loss is
    `feature_loss_weight` x SmoothL1(predicted, true next feature; both through the target's final
    norm) + `token_loss_weight` x
    KL(target distribution || drafter distribution) at the next position (EAGLE's 1.0 / 0.1).

    Side stream: training overlaps decode only while the live batch is at most
    `side_stream_max_batch` and the measured slowdown of decode steps stays under
    `side_stream_max_slowdown`; each measurement uses `side_stream_probe_steps` steps with and
    without training and is repeated every `side_stream_reprobe_steps` steps.
    """

    capture_layer: int = -1
    window: int = 64
    intermediate_size: int = 0
    max_draft_len: int = 8
    buffer_tokens: int = 262144
    buffer_max_age: int = 2
    buffer_storage: str = "device"  # device | pinned | cpu
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_tokens: int = 2048
    seq_len: int = 256
    slice_steps: int = 4
    feature_loss_weight: float = 1.0
    token_loss_weight: float = 0.1
    side_stream_max_slowdown: float = 0.05
    side_stream_max_batch: int = 8
    side_stream_probe_steps: int = 8
    side_stream_reprobe_steps: int = 256


@dataclass
class LearnedDrafterConfig(DrafterSettings):
    # off; frozen: the warm-start drafter, never trained during the run; online: trained in the
    # RL step's bubbles (ranks done early, reward computation, a gated side stream).
    kind: str = "off"
    warm_start: str | None = None  # a file of `slipstream drafter warmup`; null: start untrained
    # online: optimizer steps taken after each rollout whatever the bubbles gave (time the step
    # pays for; 0: the bubbles only), and the side-stream training of the small-batch tail (one
    # GPU, one process; gated by the measured slowdown).
    train_steps_after_rollout: int = 0
    side_stream: bool = True


@dataclass
class TrainerConfig:
    steps: int = 20
    prompts_per_step: int = 8
    micro_batch_size: int = 16  # sequences per forward/backward; the rest is accumulated
    # > 0: instead, each forward/backward takes as many rows of similar length as fit in this many
    # tokens (rows x padded length): fewer, fuller micro-batches where answers are short
    micro_batch_tokens: int = 0
    mini_batches: int = 1  # optimizer steps per rollout batch (> 1: PPO-style, the clip bounds the drift)
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    backend: str = "local"  # local (one process) | fsdp2 | deepspeed (under torchrun)
    zero_stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    cpu_offload: bool = False  # deepspeed: optimizer state and step on the CPU (ZeRO-Offload)
    # fsdp2: free a trainable layer's gathered weights after its forward (true: least memory) or keep
    # them for its backward (false: one all-gather per layer and micro-batch instead of two)
    reshard_after_forward: bool = True
    # fsdp2: consecutive layers share one unit (one all-gather, one reduce-scatter) until it holds
    # this many parameters; 0: one unit per layer. At 40M a 1.5B model keeps a layer per unit and
    # SmolLM2-135M's 30 layers of 3.5M form 2 units (4 H200s: update time 0.93 of one GPU's, 0.76
    # with a unit per layer)
    fsdp_min_unit_params: int = 40_000_000
    # Colocation on CUDA: optimizer state moves to the CPU while the engine generates, and the
    # engine's KV cache is freed while the trainer updates.
    offload_during_rollout: bool = False
    dist_timeout_s: float = 600.0  # a collective waiting longer than this ends the job with an error
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    save_every: int = 5  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    run_dir: str | None = None  # default: runs/<recipe>
    threads: int = 0  # torch CPU threads (0: torch's default)
    # steps recorded by torch.profiler: a Chrome trace and an operator table per rank under <run_dir>/profile/
    profile_steps: list[int] = field(default_factory=list)


@dataclass
class RewardConfig:
    # The reward is rule_weight * (the task's verifier) + model_weight * (the reward model's score).
    rule_weight: float = 1.0
    model_path: str | None = None  # local HF sequence-classification checkpoint (one output); null: none
    model_weight: float = 1.0
    batch_size: int = 16  # sequences the reward model scores together


@dataclass
class LoggerConfig:
    console: bool = True
    jsonl: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "slipstream"
    progress: bool = True


@dataclass
class SlipstreamConfig:
    recipe: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    spec: SpeculationConfig = field(default_factory=SpeculationConfig)
    drafter: LearnedDrafterConfig = field(default_factory=LearnedDrafterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: SlipstreamConfig) -> SlipstreamConfig:
    """Value checks that a type alone cannot express. Raises ConfigError naming the key."""
    from slipstream.tasks import TASKS
    from slipstream.trainer.algorithms import ADVANTAGE_ESTIMATORS, CRITIC_ADVANTAGES, LOSS_AGGREGATIONS, POLICY_LOSSES

    _choice("model.dtype", cfg.model.dtype, ["auto", "float32", "bfloat16", "float16"])
    _choice("task.name", cfg.task.name, sorted(TASKS))
    _choice("task.answer_format", cfg.task.answer_format, ["strict", "flexible"])
    _choice("task.style", cfg.task.style, ["words", "expression"])
    _choice("algorithm.advantage", cfg.algorithm.advantage, sorted([*ADVANTAGE_ESTIMATORS, *CRITIC_ADVANTAGES]))
    _choice("algorithm.policy_loss", cfg.algorithm.policy_loss, sorted(POLICY_LOSSES))
    _choice("algorithm.loss_agg", cfg.algorithm.loss_agg, sorted(LOSS_AGGREGATIONS))
    _choice("rollout.backend", cfg.rollout.backend, ["hf", "native"])
    _choice("attention.kind", cfg.attention.kind, ["dense", "blasst"])
    if cfg.attention.kind == "blasst":
        if cfg.rollout.backend != "native":
            raise ConfigError("attention=blasst needs rollout=native (the HF backend has no skip-softmax)")
        if cfg.attention.prefill_scale <= 0 and cfg.attention.decode_scale <= 0:
            raise ConfigError("attention=blasst needs attention.prefill_scale or attention.decode_scale > 0")
    _choice("trainer.backend", cfg.trainer.backend, ["local", "fsdp2", "deepspeed"])
    _choice("trainer.zero_stage", cfg.trainer.zero_stage, [1, 2, 3])
    if cfg.trainer.backend == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("trainer.backend=deepspeed needs the deepspeed package, which is not installed: "
                              "pip install 'slipstream[deepspeed]' (or use trainer.backend=fsdp2)")
    if cfg.trainer.backend != "local" and cfg.rollout.backend == "hf":
        raise ConfigError(f"trainer.backend={cfg.trainer.backend} needs rollout=native: the hf rollout generates "
                          f"with the trainer's sharded module, whose collectives ranks cannot run in step")
    if not 0.0 <= cfg.algorithm.gamma <= 1.0 or not 0.0 <= cfg.algorithm.lam <= 1.0:
        raise ConfigError(f"algorithm.gamma={cfg.algorithm.gamma} and algorithm.lam={cfg.algorithm.lam} must be "
                          f"in [0, 1]")
    if cfg.reward.model_path is not None and not Path(cfg.reward.model_path).is_dir():
        raise ConfigError(f"reward.model_path={cfg.reward.model_path!r} is not a directory (a local HF "
                          f"sequence-classification checkpoint)")
    if cfg.reward.rule_weight == 0 and cfg.reward.model_path is None:
        raise ConfigError("reward.rule_weight=0 and no reward.model_path: nothing would score the samples")
    _choice("trainer.device", cfg.trainer.device, ["auto", "cpu", "cuda"])
    outside = [s for s in cfg.trainer.profile_steps if not 1 <= s <= cfg.trainer.steps]
    if outside:
        raise ConfigError(f"trainer.profile_steps has {outside}, outside the run's steps 1..{cfg.trainer.steps}")
    _choice("logger.wandb_mode", cfg.logger.wandb_mode, ["offline", "online", "disabled"])
    for key in ("rollout.n", "rollout.max_tokens", "rollout.batch_size", "rollout.eval_max_tokens",
                "rollout.block_size", "rollout.kv_cache_gb", "rollout.max_num_seqs", "rollout.max_num_batched_tokens",
                "rollout.max_model_len", "rollout.decode_steps",
                "trainer.prompts_per_step", "trainer.micro_batch_size", "trainer.mini_batches", "trainer.lr", "task.num_train",
                "task.min_steps", "task.max_operand", "algorithm.critic_lr", "trainer.dist_timeout_s",
                "reward.batch_size"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name))
    for key in ("trainer.steps", "trainer.eval_every", "trainer.save_every", "rollout.temperature",
                "algorithm.kl_coef", "task.num_eval", "trainer.warmup_steps", "trainer.threads",
                "trainer.fsdp_min_unit_params", "trainer.micro_batch_tokens",
                "attention.prefill_scale", "attention.decode_scale", "algorithm.value_clip",
                "reward.rule_weight", "reward.model_weight"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name), allow_zero=True)
    _choice("spec.kind", cfg.spec.kind, SPEC_KINDS)
    if cfg.spec.kind != "off" and cfg.rollout.backend != "native":
        raise ConfigError(f"spec={cfg.spec.kind} needs rollout=native (the HF backend does not speculate)")
    engine_spec_config(cfg.spec, cfg.trainer.seed)
    _choice("drafter.kind", cfg.drafter.kind, ["off", "frozen", "online"])
    if cfg.drafter.kind != "off" and cfg.rollout.backend != "native":
        raise ConfigError(f"drafter={cfg.drafter.kind} needs rollout=native (features come from the native engine)")
    if cfg.drafter.warm_start is not None and not Path(cfg.drafter.warm_start).is_file():
        raise ConfigError(f"drafter.warm_start={cfg.drafter.warm_start!r} is not a file (write one with "
                          f"`slipstream drafter warmup`)")
    drafter_config(cfg.drafter, cfg.trainer.seed)
    _check_drafting(cfg)
    if cfg.task.max_steps < cfg.task.min_steps:
        raise ConfigError(f"task.max_steps={cfg.task.max_steps} must be >= task.min_steps={cfg.task.min_steps}")
    if not 0.0 < cfg.task.step_p <= 1.0:
        raise ConfigError(f"task.step_p={cfg.task.step_p} must be in (0, 1]")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.algorithm.tis_cap < 1.0:
        raise ConfigError(f"algorithm.tis_cap={cfg.algorithm.tis_cap} must be >= 1")
    if cfg.rollout.n < 2 and cfg.algorithm.advantage == "grpo":
        raise ConfigError("rollout.n must be >= 2 for GRPO: advantages are normalised within a group")
    if cfg.task.name == "gsm8k" and not cfg.task.path:
        raise ConfigError("task.path must name a GSM8K-format file (jsonl or parquet) when task.name=gsm8k")
    if not set(cfg.task.operations) <= set("+-*") or not cfg.task.operations:
        raise ConfigError(f"task.operations={cfg.task.operations!r} must be a non-empty subset of '+-*'")
    return cfg


SPEC_KINDS = ["off", "suffix", "drafter", "both"]
LEARNED_SPEC_KINDS = ("drafter", "both")


def _check_drafting(cfg: SlipstreamConfig) -> None:
    """The combinations of spec and drafter that cannot run."""
    spec, drafter = cfg.spec, cfg.drafter
    if spec.kind in LEARNED_SPEC_KINDS and drafter.kind == "off":
        raise ConfigError(f"spec={spec.kind} drafts with the learned drafter, but drafter=off: choose drafter=online "
                          f"(trained during the run) or drafter=frozen with drafter.warm_start=FILE")
    if drafter.kind == "frozen" and drafter.warm_start is None:
        raise ConfigError("drafter=frozen never trains: it needs drafter.warm_start=FILE (write one with "
                          "`slipstream drafter warmup`)")
    if drafter.train_steps_after_rollout < 0:
        raise ConfigError(f"drafter.train_steps_after_rollout must be >= 0, got {drafter.train_steps_after_rollout}")
    if spec.sources and spec.kind not in LEARNED_SPEC_KINDS:
        raise ConfigError(f"spec.sources picks between draft sources of spec=drafter or spec=both, "
                          f"not spec={spec.kind}")
    source_policy_config(spec, cfg.trainer.seed)


def draft_sources(spec: SpeculationConfig) -> tuple[str, ...]:
    """The draft sources of spec=drafter|both (see `SpeculationConfig.sources`)."""
    if spec.sources:
        return tuple(spec.sources)
    return ("none", "drafter") if spec.kind == "drafter" else ("none", "suffix", "drafter", "both")


def source_policy_config(spec: SpeculationConfig, seed: int = 0):
    """The learned drafter's source policy (`slipstream.drafter.SourcePolicyConfig`) for
    spec=drafter|both, None otherwise; ConfigError names a bad key."""
    from slipstream.drafter.source_policy import SourcePolicyConfig

    if spec.kind not in LEARNED_SPEC_KINDS:
        return None
    sources = draft_sources(spec)
    if spec.kind == "drafter" and any(s in ("suffix", "both") for s in sources):
        raise ConfigError(f"spec.sources={list(sources)}: spec=drafter has no suffix drafts; use spec=both")
    try:
        return SourcePolicyConfig(sources=sources, min_batch_for_off=spec.min_batch_for_off,
                                  bucket_edges=tuple(spec.bucket_edges), epsilon=spec.epsilon,
                                  guard_margin=spec.guard_margin, explore_cost=spec.explore_cost,
                                  seed=seed)
    except ValueError as e:
        raise ConfigError(f"spec.sources: {e}") from None


def drafter_config(drafter: LearnedDrafterConfig, seed: int = 0):
    """The learned drafter's settings (`slipstream.drafter.DrafterConfig`); ConfigError names a bad key."""
    import dataclasses

    from slipstream.drafter.config import DrafterConfig

    values = {f.name: getattr(drafter, f.name) for f in dataclasses.fields(DrafterSettings)}
    try:
        return DrafterConfig(**values, seed=seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def engine_spec_config(spec: SpeculationConfig, seed: int = 0):
    """The native engine's speculation settings (`rollout.spec.SpecConfig`), None for spec=off.
    Raises ConfigError naming the key of a value the drafter or the policy rejects."""
    from slipstream.rollout.spec import PolicyConfig, SpecConfig, SuffixConfig

    if spec.kind == "off":
        return None
    try:
        suffix = SuffixConfig(window_steps=spec.window_steps, max_depth=spec.max_depth,
                              live_max_depth=spec.live_max_depth, cap=spec.cap,
                              alpha=spec.alpha, min_token_prob=spec.min_token_prob,
                              max_tokens_per_prompt=spec.max_tokens_per_prompt, max_prompts=spec.max_prompts)
        policy = PolicyConfig(min_batch_for_off=spec.min_batch_for_off, bucket_edges=tuple(spec.bucket_edges),
                              draft_lens=tuple(spec.draft_lens), max_step_draft_tokens=spec.max_step_draft_tokens,
                              long_boost=spec.long_boost, num_length_classes=spec.num_length_classes,
                              epsilon=spec.epsilon, guard_margin=spec.guard_margin,
                              explore_cost=spec.explore_cost, seed=seed)
    except ValueError as e:
        raise ConfigError(f"spec: {e}") from None
    return SpecConfig(suffix=suffix, policy=policy)


def _data_dir(repo_name: str, installed_name: str) -> Path:
    """conf/ or recipes/ at the root of a source checkout; in an installed wheel, slipstream/_conf etc."""
    package = Path(__file__).resolve().parent
    if (package.parent / "pyproject.toml").is_file() and (package.parent / repo_name).is_dir():
        return package.parent / repo_name
    return package / installed_name


def conf_dir() -> Path:
    return _data_dir("conf", "_conf")


def recipes_dir() -> Path:
    return _data_dir("recipes", "_recipes")


def user_conf_dir() -> Path:
    """Config options written by slipstream itself (e.g. `calibrate-sparsity`), in the cache."""
    from slipstream.models.registry import cache_dir

    return cache_dir() / "conf"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _user_options(group: str) -> list[Path]:
    builtin = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
    return [p for p in sorted((user_conf_dir() / group).glob("*.yaml")) if p.stem not in builtin]


def group_options(group: str) -> list[str]:
    return sorted([p.stem for p in (conf_dir() / group).glob("*.yaml")] + [p.stem for p in _user_options(group)])


_SECTIONS = {"model": ModelConfig, "task": TaskConfig, "algorithm": AlgorithmConfig, "rollout": RolloutConfig,
             "attention": AttentionConfig, "spec": SpeculationConfig, "trainer": TrainerConfig, "reward": RewardConfig,
             "logger": LoggerConfig, "drafter": LearnedDrafterConfig}


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="slipstream_schema", node=SlipstreamConfig)
    # Recipes live in recipes/ (data, `# @package _global_`); hydra sees them as the `recipe` group.
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    for path in _user_options("attention"):  # e.g. attention=calibrated-smollm2-135m-instruct
        cs.store(group="attention", name=path.stem, node=OmegaConf.load(path))


def _unknown_key_message(full_key: str) -> str:
    section, _, name = full_key.partition(".")
    if section in _SECTIONS and name:
        valid = section_keys(_SECTIONS[section])
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
        return f"unknown config key '{full_key}'.{hint} Valid keys of '{section}': {', '.join(valid)}"
    valid = list(_SECTIONS) + ["recipe"]
    close = difflib.get_close_matches(section, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{full_key}'.{hint} Valid top-level keys: {', '.join(valid)}"


def _reject_unknown_keys(raw: dict) -> None:
    top = set(section_keys(SlipstreamConfig))
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(_unknown_key_message(key))
        if key in _SECTIONS and isinstance(value, dict):
            for sub in value:
                if sub not in section_keys(_SECTIONS[key]):
                    raise ConfigError(_unknown_key_message(f"{key}.{sub}"))


def compose(overrides: list[str]) -> SlipstreamConfig:
    """Compose conf/ + the chosen recipe + command-line overrides into a validated SlipstreamConfig.

    Every user mistake comes out as ConfigError with a message naming the key or option.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "recipe" and "=" in o and o.split("=", 1)[1] not in available_recipes():
            raise ConfigError(f"unknown recipe '{o.split('=', 1)[1]}'; available recipes: "
                              f"{', '.join(available_recipes())}")
        if "." not in key and key in _SECTIONS and "=" in o and o.split("=", 1)[1] not in group_options(key):
            raise ConfigError(f"unknown {key} '{o.split('=', 1)[1]}'; available: {', '.join(group_options(key))}"
                              + (f" (or set {key}.name=PATH for a local model directory)" if key == "model" else ""))
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=overrides)
        _reject_unknown_keys(OmegaConf.to_container(raw, resolve=False))
        cfg = OmegaConf.to_object(raw)
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse override: {e}") from None
    except MissingConfigException as e:
        raise ConfigError(str(e).strip()) from None
    except ConfigCompositionException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigKeyError) or "Could not override" in str(e) or "Could not append" in str(e):
            key = getattr(cause, "full_key", None) or str(e).split("'")[1]
            raise ConfigError(_unknown_key_message(key)) from None
        if isinstance(cause, ValidationError):
            raise ConfigError(f"{cause.full_key}: {cause.msg.splitlines()[0]}") from None
        raise ConfigError(str(e).strip()) from None
    except ValidationError as e:
        raise ConfigError(f"{e.full_key}: {e.msg.splitlines()[0]}") from None
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e.full_key)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).strip()) from None
    finally:
        GlobalHydra.instance().clear()
    return validate(cfg)


def section_keys(dc) -> list[str]:
    return [f.name for f in fields(dc)]
