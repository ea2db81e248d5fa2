"""Models: the registry of known names, pulling them into the cache, and loading them.

Importing this package is cheap: torch and transformers are imported only when a model is
built, pulled or loaded.
"""

from slipstream.models.loading import load_model_and_tokenizer, resolve_dtype, resolve_model
from slipstream.models.pull import (
    convert_gguf_to_hf,
    download_gguf,
    install_atomically,
    pull,
    pull_tiny,
    sha256_file,
    verify_sha256,
)
from slipstream.models.registry import (
    MODELS,
    SOURCE_FILE,
    ModelLoadError,
    ModelSpec,
    PullError,
    cache_dir,
    is_complete,
    model_dir,
    models_dir,
    registered_names,
    tiny_model_name,
)
from slipstream.models.tiny import build_tiny_model_dir, build_tiny_tokenizer

__all__ = [
    "MODELS",
    "SOURCE_FILE",
    "ModelLoadError",
    "ModelSpec",
    "PullError",
    "build_tiny_model_dir",
    "build_tiny_tokenizer",
    "cache_dir",
    "convert_gguf_to_hf",
    "download_gguf",
    "install_atomically",
    "is_complete",
    "load_model_and_tokenizer",
    "model_dir",
    "models_dir",
    "pull",
    "pull_tiny",
    "registered_names",
    "resolve_dtype",
    "resolve_model",
    "sha256_file",
    "tiny_model_name",
    "verify_sha256",
]
