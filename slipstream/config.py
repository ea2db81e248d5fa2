"""Typed configuration: one dataclass per hydra config group, registered in hydra's ConfigStore.

The YAML files under conf/ and recipes/ fill these schemas; anything that does not fit (an unknown
key, a value of the wrong type, a choice that does not exist) is reported at start by
`validate()` or by the CLI, naming the key and the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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


@dataclass
class TrainerConfig:
    steps: int = 20
    prompts_per_step: int = 8
    micro_batch_size: int = 16  # sequences per forward/backward; the rest is accumulated
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    backend: str = "local"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    save_every: int = 5  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    run_dir: str | None = None  # default: runs/<recipe>
    threads: int = 0  # torch CPU threads (0: torch's default)


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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
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
    from slipstream.trainer.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

    _choice("model.dtype", cfg.model.dtype, ["auto", "float32", "bfloat16", "float16"])
    _choice("task.name", cfg.task.name, sorted(TASKS))
    _choice("task.answer_format", cfg.task.answer_format, ["strict", "flexible"])
    _choice("algorithm.advantage", cfg.algorithm.advantage, sorted(ADVANTAGE_ESTIMATORS))
    _choice("algorithm.policy_loss", cfg.algorithm.policy_loss, sorted(POLICY_LOSSES))
    _choice("algorithm.loss_agg", cfg.algorithm.loss_agg, sorted(LOSS_AGGREGATIONS))
    _choice("rollout.backend", cfg.rollout.backend, ["hf"])
    _choice("trainer.backend", cfg.trainer.backend, ["local"])
    _choice("trainer.device", cfg.trainer.device, ["auto", "cpu", "cuda"])
    _choice("logger.wandb_mode", cfg.logger.wandb_mode, ["offline", "online", "disabled"])
    for key in ("rollout.n", "rollout.max_tokens", "rollout.batch_size", "rollout.eval_max_tokens",
                "trainer.prompts_per_step", "trainer.micro_batch_size", "trainer.lr", "task.num_train",
                "task.min_steps", "task.max_operand"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name))
    for key in ("trainer.steps", "trainer.eval_every", "trainer.save_every", "rollout.temperature",
                "algorithm.kl_coef", "task.num_eval", "trainer.warmup_steps", "trainer.threads"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name), allow_zero=True)
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


def section_keys(dc) -> list[str]:
    return [f.name for f in fields(dc)]


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="slipstream_schema", node=SlipstreamConfig)
    for group, schema in (("model", ModelConfig), ("task", TaskConfig), ("algorithm", AlgorithmConfig),
                          ("rollout", RolloutConfig), ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name=f"{group}_schema", node=schema)
