import os

import pytest

# Triton decides at decoration time whether a kernel runs in its interpreter, and the kernels are
# decorated when a module importing them is first imported, during collection, by whichever test
# module comes first. So the interpreter is on for the whole collection; afterwards the variable is
# put back, so that the suite keeps the torch paths on CPU, and tests/kernels turns it on again
# around each kernel test.
_SAVED_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_finish(session):
    if _SAVED_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_INTERPRET


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
