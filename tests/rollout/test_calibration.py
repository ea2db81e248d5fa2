import os
import subprocess
import sys

import pytest

from slipstream.config import compose
from slipstream.models.weights import decoder_from_hf_module
from slipstream.rollout.calibration import calibrate_skip_scale
from slipstream.rollout.engine import Engine, EngineConfig
from slipstream.rollout.types import Request, SamplingParams


def test_bisection_reaches_the_target_with_the_smallest_probed_scale(tiny_model):
    model, tok = tiny_model
    decoder = decoder_from_hf_module(model)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    reqs = [Request(tok(("Start with 7. " * 30)[:n], add_special_tokens=False)["input_ids"], params, f"g{n}", f"r{n}")
            for n in (300, 420)]

    def make(scale):
        return Engine(decoder, [tok.eos_token_id], EngineConfig(block_size=16, num_blocks=256, decode_skip_scale=scale))

    result = calibrate_skip_scale(make, reqs, "decode", target=0.3, iters=10)
    assert result.sparsity >= 0.3
    below = [s for scale, s in result.trials if scale < result.scale]
    assert below and max(below) < 0.3  # every smaller scale probed missed the target
    with pytest.raises(ValueError, match="phase"):
        calibrate_skip_scale(make, reqs, "both", target=0.3)


def test_cli_writes_an_attention_option_that_composes(tmp_path):
    env = dict(os.environ, SLIPSTREAM_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "slipstream.cli", "calibrate-sparsity", "recipe=smoke",
                        "rollout.eval_max_tokens=4", "--prompts", "2", "--target", "0.5", "--name", "mine"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "conf" / "attention" / "mine.yaml").is_file()
    os.environ["SLIPSTREAM_CACHE"], old = str(tmp_path), os.environ["SLIPSTREAM_CACHE"]
    try:
        cfg = compose(["recipe=smoke", "attention=mine"])
    finally:
        os.environ["SLIPSTREAM_CACHE"] = old
    assert cfg.attention.kind == "blasst" and cfg.attention.decode_scale > 0
