"""Warm start: train a drafter offline on the target's own samples, so the first RL step speculates.

`slipstream drafter warmup` generates with the native engine on the task's training prompts (the
rollout's sampling parameters, `params.n` samples per prompt), captures the drafter's feature
layer into a `FeatureBuffer`, trains for a number of steps and writes a drafter file that an RL
run loads (`load_drafter`). The file records the target it was trained for and refuses another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slipstream.drafter.bubble_trainer import BubbleTrainer
from slipstream.drafter.config import DrafterConfig
from slipstream.drafter.feature_buffer import FeatureBuffer
from slipstream.drafter.model import Drafter, TargetHead

__all__ = ["DrafterFileError", "WarmupResult", "load_drafter", "save_drafter", "warmup"]

FORMAT = "slipstream-drafter"
FORMAT_VERSION = 1


class DrafterFileError(ValueError):
    """A drafter file that cannot be used: not one, damaged, or trained for another target."""


def _target_signature(target) -> dict[str, Any]:
    c = target.config if hasattr(target, "config") else target
    return {"model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim}


def save_drafter(path: str | Path, drafter: Drafter, model_name: str, extra: dict[str, Any] | None = None) -> Path:
    """Write the drafter's weights, its config and the target it belongs to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_name,
                "target": _target_signature(drafter.target_config),
                # the MLP width as built (0 in the config means "the target's", which may differ elsewhere)
                "config": dataclasses.asdict(dataclasses.replace(
                    drafter.config, intermediate_size=drafter.layer.down_proj.in_features)),
                "state_dict": {k: v.detach().cpu() for k, v in drafter.state_dict().items()},
                "extra": extra or {}}, path)
    return path


def load_drafter(path: str | Path, target, config: DrafterConfig | None = None, device=None) -> Drafter:
    """A drafter for the `slipstream.models.decoder.Decoder` `target` from a file of `save_drafter`.

    The model-shaping settings (capture layer, window, MLP width) come from the file; `config`
    supplies the others (learning rate, buffer, ...) and defaults to the file's.
    """
    path = Path(path)
    if not path.is_file():
        raise DrafterFileError(f"drafter file {path} does not exist (write one with `slipstream drafter warmup`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which, not where torch failed
        raise DrafterFileError(f"{path} is not a readable drafter file: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DrafterFileError(f"{path} is not a slipstream drafter file")
    want = _target_signature(target)
    if blob["target"] != want:
        raise DrafterFileError(f"drafter file {path} was trained for {blob['model']} {blob['target']}, "
                               f"the target here is {want}")
    saved = DrafterConfig(**blob["config"])
    shape = {k: getattr(saved, k) for k in ("capture_layer", "window", "intermediate_size")}
    config = dataclasses.replace(config or saved, **shape)
    drafter = Drafter(target.config, TargetHead.from_decoder(target), config, device=device)
    drafter.load_state_dict(blob["state_dict"])
    return drafter


@dataclass
class WarmupResult:
    path: Path
    samples: int  # completions generated
    tokens: int  # generated tokens
    pairs: int  # training pairs in the buffer
    steps: int
    first_loss: float
    last_loss: float


def warmup(cfg, out: str | Path, steps: int, num_prompts: int, drafter_config: DrafterConfig | None = None,
           show_progress: bool = True) -> WarmupResult:
    """Generate on `num_prompts` training prompts of `cfg.task` with `cfg.model`, then train `steps`
    steps; `cfg` is a composed `slipstream.config` configuration."""
    from slipstream.models import load_model_and_tokenizer
    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams
    from slipstream.tasks import build_task
    from slipstream.telemetry.progress import progress_bar
    from slipstream.trainer.rl_loop import encode_prompt, pick_device

    if steps < 1 or num_prompts < 1:
        raise ValueError(f"warmup needs steps >= 1 and prompts >= 1, got {steps} and {num_prompts}")
    dcfg = drafter_config or DrafterConfig()
    device = pick_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    model, tok = load_model_and_tokenizer(cfg.model, device)
    decoder = decoder_from_hf_module(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                     device=device)
    del model
    buffer = FeatureBuffer(dcfg, decoder.config.hidden_size, decoder.embed.weight.dtype, device)
    rc = cfg.rollout
    engine = Engine(decoder, [tok.eos_token_id],
                    EngineConfig(block_size=rc.block_size, kv_cache_gb=rc.kv_cache_gb, max_num_seqs=rc.max_num_seqs,
                                 max_num_batched_tokens=rc.max_num_batched_tokens, max_model_len=rc.max_model_len),
                    seed=cfg.trainer.seed, capture_layers=(dcfg.capture_layer,), feature_sink=buffer)
    params = SamplingParams(n=rc.n, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                            max_tokens=rc.max_tokens, seed=cfg.trainer.seed)
    problems = build_task(cfg.task).train_problems()[:num_prompts]
    requests = [Request(encode_prompt(tok, p, cfg.task.system_prompt), params, p.uid, p.uid) for p in problems]
    with progress_bar(len(requests) * rc.n, "drafter warmup: generate", enabled=show_progress) as bar:
        completions = engine.generate(requests, progress=bar.update)
    pairs = buffer.num_pairs()
    if pairs == 0:
        raise ValueError("warmup generated no training pairs (every completion was a single token?); "
                         "raise rollout.max_tokens or the number of prompts")

    drafter = Drafter(decoder.config, TargetHead.from_decoder(decoder), dcfg, device=device)
    trainer = BubbleTrainer(drafter, buffer)
    losses = []
    with progress_bar(steps, "drafter warmup: train", enabled=show_progress, unit="step") as bar:
        for i in range(steps):
            trainer.train_step()
            if i == 0 or i == steps - 1 or i % 10 == 0:  # reading the loss syncs: not every step
                losses.append(float(trainer.last_stats["loss"]))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    tokens = sum(len(c.tokens) for c in completions)
    path = save_drafter(out, drafter, cfg.model.name,
                        extra={"samples": len(completions), "tokens": tokens, "steps": steps, "loss": losses[-1]})
    return WarmupResult(path, len(completions), tokens, pairs, steps, losses[0], losses[-1])
