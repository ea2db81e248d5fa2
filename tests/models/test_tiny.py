"""The tiny random model: its tokenizer, chat template, forward pass and determinism."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
from safetensors.torch import load_file

from slipstream.models import build_tiny_model_dir
from slipstream.models.tiny import VOCAB_SIZE


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_directory_is_a_regular_hf_model_dir(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["intermediate_size"] == 256 and config["max_position_embeddings"] == 2048
    assert config["tie_word_embeddings"] is True


def test_tokenizer_round_trips_arbitrary_ascii(tokenizer):
    rng = random.Random(1234)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r"
    samples = [string.printable, "", " ", "\n\n", "  leading and trailing  ", "12 + 7 = 19\n#### 19"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(50)]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tokenizer) for i in ids)
        assert tokenizer.decode(ids) == text
    # Non-ASCII text round-trips too (one token per UTF-8 byte).
    text = "héllo ∑ 😀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    # The tokenizer itself adds nothing: prompts come from the chat template.
    assert tokenizer("abc")["input_ids"] == tokenizer("abc", add_special_tokens=False)["input_ids"]


def test_chat_template_smollm2_style(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert plain.endswith("What is 2+2?<|im_end|>\n") and not plain.endswith("assistant\n")


def test_model_logits_have_vocab_size(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
    batch = tokenizer(["1+1=", "hello world"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_same_seed_same_weights_other_seed_differs(tiny_dir, tmp_path):
    state = torch.get_rng_state()
    again = build_tiny_model_dir(tmp_path / "again", seed=0)
    assert torch.equal(state, torch.get_rng_state()), "building must not disturb the global RNG"
    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (tiny_dir, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 64)


def test_other_sizes_and_invalid_sizes(tmp_path):
    path = build_tiny_model_dir(tmp_path / "wide", hidden_size=32, layers=1)
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (32, 1, 128)
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_model_dir(tmp_path / "bad", hidden_size=30)
