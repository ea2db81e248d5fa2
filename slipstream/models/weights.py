"""Building the engine's decoder from Hugging Face checkpoints and modules.

A checkpoint directory holds config.json and either one `*.safetensors` file or shards listed in
`model.safetensors.index.json`. Parameter names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`,
...); `Decoder.hf_target` maps each to the decoder tensor (or fused slice) it fills.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from slipstream.models.decoder import Decoder, DecoderConfig
from slipstream.models.registry import ModelLoadError

__all__ = ["decoder_from_hf_module", "iter_safetensors", "load_decoder", "safetensors_files"]

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir) -> list[Path]:
    """The weight files of a checkpoint directory: the shards of its index, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_safetensors(model_dir) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of a checkpoint directory, one at a time."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _model_dir(path_or_dir) -> Path:
    path = Path(path_or_dir).expanduser()
    if path.is_file():  # config.json or a weights file inside the directory
        return path.parent
    if path.is_dir():
        return path
    from slipstream.models.loading import resolve_model  # a registered name: its cache directory

    resolved = Path(resolve_model(str(path_or_dir)))
    if not resolved.is_dir():
        raise ModelLoadError(f"{path_or_dir!r} is not a local model directory (config.json + *.safetensors)")
    return resolved


def load_decoder(path_or_dir, dtype: torch.dtype | str = torch.float32, device="cpu") -> tuple[Decoder, DecoderConfig]:
    """Build a Decoder from a Hugging Face safetensors directory (or a registered model name).

    Every weight is cast to `dtype` (a torch dtype, or a name as in model.dtype: "auto", "bfloat16",
    ...) and placed on `device`; a checkpoint missing any weight the decoder needs raises ModelLoadError.
    """
    from transformers import AutoConfig

    if isinstance(dtype, str):
        from slipstream.models.loading import resolve_dtype

        dtype = resolve_dtype(dtype, device)

    model_dir = _model_dir(path_or_dir)
    config = DecoderConfig.from_hf(AutoConfig.from_pretrained(str(model_dir)))
    decoder = Decoder(config, dtype=dtype, device=device)
    loaded = decoder.load_weights(iter_safetensors(model_dir))
    missing = [n for n in decoder.hf_parameter_names() if n not in loaded]
    if missing:
        raise ModelLoadError(f"{model_dir} lacks {len(missing)} weight(s) of the decoder, e.g. {missing[:3]}")
    return decoder.eval(), config


def decoder_from_hf_module(hf_model: torch.nn.Module, dtype: torch.dtype | None = None, device=None) -> Decoder:
    """A Decoder holding a copy of an in-memory `*ForCausalLM` module's weights.

    dtype and device default to those of the module's parameters.
    """
    first = next(hf_model.parameters())
    config = DecoderConfig.from_hf(hf_model.config)
    decoder = Decoder(config, dtype=dtype or first.dtype, device=device if device is not None else first.device)
    loaded = decoder.load_weights(hf_model.state_dict().items())
    missing = [n for n in decoder.hf_parameter_names() if n not in loaded]
    if missing:
        raise ModelLoadError(f"the module's state_dict lacks {len(missing)} weight(s) of the decoder: {missing[:3]}")
    return decoder.eval()
