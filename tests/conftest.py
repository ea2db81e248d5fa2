import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Models built by tests (the tiny random model) go to a private cache, never the user's."""
    old = os.environ.get("SLIPSTREAM_CACHE")
    os.environ["SLIPSTREAM_CACHE"] = str(tmp_path_factory.mktemp("slipstream-cache"))
    os.environ.setdefault("WANDB_SILENT", "true")
    yield
    if old is None:
        os.environ.pop("SLIPSTREAM_CACHE", None)
    else:
        os.environ["SLIPSTREAM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model():
    """The smoke recipe's tiny random model and its character tokenizer (float32, CPU)."""
    import torch

    from slipstream.config import ModelConfig
    from slipstream.models import load_model_and_tokenizer

    torch.manual_seed(0)
    return load_model_and_tokenizer(ModelConfig(name="tiny-random", dtype="float32"), torch.device("cpu"))
