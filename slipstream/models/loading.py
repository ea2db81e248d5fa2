"""From `model.name` to a (model, tokenizer) pair on a device.

`model.name` may be:
  * a local directory in Hugging Face format: used as is;
  * "tiny-random": a tiny random Llama, built once into the cache (sizes from model.tiny_*);
  * a registered name (see MODELS): its cache directory, pulled first if missing;
  * anything else: handed to transformers as a hub id.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from slipstream.models.registry import (
    MODELS,
    TINY_DEFAULTS,
    ModelLoadError,
    is_complete,
    model_dir,
    registered_names,
)

if TYPE_CHECKING:
    import torch

    from slipstream.config import ModelConfig

__all__ = ["ModelLoadError", "resolve_model", "resolve_dtype", "load_model_and_tokenizer"]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..")


def _unknown_model_message(name: str, reason: str = "") -> str:
    return (
        f"cannot load model {name!r}{': ' + reason if reason else ''}\n"
        f"model.name must be a registered name ({', '.join(registered_names())}), "
        "a local directory in Hugging Face format (config.json, *.safetensors, tokenizer files), "
        "or a Hugging Face hub id reachable from this machine."
    )


def resolve_model(
    name_or_path,
    pull_missing: bool = True,
    *,
    tiny_hidden_size: int = TINY_DEFAULTS["hidden_size"],
    tiny_layers: int = TINY_DEFAULTS["layers"],
) -> str:
    """The directory (or hub id) that `from_pretrained` should read for `name_or_path`."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    if name == "tiny-random":
        from slipstream.models.pull import pull_tiny

        return str(pull_tiny(hidden_size=tiny_hidden_size, layers=tiny_layers))
    if name in MODELS:
        path = model_dir(name)
        if is_complete(path):
            return str(path)
        if not pull_missing:
            raise ModelLoadError(
                f"model {name!r} is not in the cache ({path}); fetch it with `slipstream models pull {name}` "
                f"(or slipstream.models.pull({name!r}))"
            )
        from slipstream.models.pull import pull

        print(f"[slipstream] model {name!r} not in the cache yet; pulling it into {path} ...",
              file=sys.stderr, flush=True)
        return str(pull(name))
    if _looks_like_path(name) or local.exists():
        raise ModelLoadError(_unknown_model_message(name, "no such directory"))
    return name


def resolve_dtype(dtype: str, device) -> "torch.dtype":
    """"auto": float32 on CPU, bfloat16 on CUDA (float32 where the GPU lacks bfloat16)."""
    import torch

    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, _ = torch.cuda.get_device_capability(index)
            return torch.bfloat16 if major >= 8 else torch.float32
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={dtype!r} is not valid; choose one of: auto, {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[dtype])


def load_model_and_tokenizer(cfg: "ModelConfig", device):
    """Load `cfg.name` as (AutoModelForCausalLM, tokenizer) on `device`.

    The tokenizer pads on the left (for batched generation) and always has a pad token (eos if the
    model defines none). Gradient checkpointing (non-reentrant) is on if cfg.gradient_checkpointing.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    path = resolve_model(cfg.name, tiny_hidden_size=cfg.tiny_hidden_size, tiny_layers=cfg.tiny_layers)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        config = AutoConfig.from_pretrained(path)  # first: an unreachable hub id fails here, once
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # OSError (not found / offline), ValueError (unknown architecture), ...
        raise ModelLoadError(_unknown_model_message(cfg.name, f"{type(exc).__name__}: {exc}")) from exc

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {cfg.name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id

    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # newer name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.to(device)
    return model, tokenizer
